// Clicks Retry on a failed flow run in Prefect's UI (headless Debian chromium, playwright-core),
// waits for the run to complete, and screenshots the flow run pages.
// Usage: node retry_in_ui.mjs BASE_URL FLOW_RUN_ID SHOT_DIR TIMEOUT_S
// Prints one JSON line per step on stdout; exits non-zero on any failure.
import { chromium } from 'playwright-core';

const [base, runId, shots, timeoutS] = process.argv.slice(2);
const deadline = Date.now() + Number(timeoutS) * 1000;
const log = (step, extra = {}) => console.log(JSON.stringify({ step, ...extra }));
const api = async (path, body) => {
  const r = await fetch(`${base}/api${path}`, body === undefined ? {} : {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  return r.json();
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.setDefaultTimeout(60_000);
  await page.goto(`${base}/v2/runs/flow-run/${runId}`); // the default (V2) UI
  await page.getByText('Failed').first().waitFor();
  log('opened', { state: (await api(`/flow_runs/${runId}`)).state_name });

  // The run's actions menu ("Open menu" is the button's accessible name), then Retry.
  await page.getByRole('button', { name: 'Open menu' }).first().click();
  await page.getByRole('menuitem', { name: 'Retry' }).click();
  const dialog = page.getByRole('alertdialog');
  await dialog.getByText('Retry Flow Run').waitFor();
  await page.screenshot({ path: `${shots}/retry-dialog.png` });
  await dialog.getByRole('button', { name: 'Retry', exact: true }).click();
  await page.getByText('Flow run scheduled for retry').waitFor();
  log('clicked', { state: (await api(`/flow_runs/${runId}`)).state_name });

  let run;
  for (;;) {
    run = await api(`/flow_runs/${runId}`);
    if (run.run_count >= 2 && ['COMPLETED', 'FAILED', 'CRASHED'].includes(run.state_type)) break;
    if (Date.now() > deadline) throw new Error(`still ${run.state_name} after ${timeoutS} s`);
    await new Promise((r) => setTimeout(r, 1000));
  }
  log('finished', { state: run.state_name, run_count: run.run_count });

  // The parent run and the retried distill subflow run, with their graphs drawn.
  const subs = await api('/flow_runs/filter', {
    flow_runs: { parent_flow_run_id: { any_: [runId] } }, sort: 'EXPECTED_START_TIME_DESC',
  });
  for (const [id, name] of [[runId, 'flow-run'], [subs[0].id, 'distill-subflow']]) {
    await page.goto(`${base}/v2/runs/flow-run/${id}`);
    await page.getByText('Completed').first().waitFor();
    await page.waitForTimeout(4000); // the graph lays itself out after the data arrives
    await page.screenshot({ path: `${shots}/${name}.png` });
    log('screenshot', { path: `${shots}/${name}.png` });
  }
} finally {
  await browser.close();
}
