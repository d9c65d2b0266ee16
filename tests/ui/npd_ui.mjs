// Opens the two UIs of `npd ui` in headless Debian chromium (playwright-core): a run's summary
// artifact in Prefect's UI, read back as the table the page renders, and MLflow's experiment list.
// Usage: node npd_ui.mjs PREFECT_URL ARTIFACT_ID MLFLOW_URL EXPERIMENT SHOT_DIR
// Prints one JSON line per step on stdout; exits non-zero on any failure.
import { chromium } from 'playwright-core';

const [prefect, artifactId, mlflow, experiment, shots] = process.argv.slice(2);
const log = (step, extra = {}) => console.log(JSON.stringify({ step, ...extra }));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.setDefaultTimeout(60_000);

  // The artifact's page fetches the artifact from the API that /ui-settings names: with a wrong
  // api_url the page shows "Can't connect to Server API" and no table ever appears.
  // The markdown's heading and its table render apart and the page may re-render between two
  // reads (a fresh-clone CI once read the heading empty after waiting for it): read both in one
  // snapshot of the DOM, taken once the heading and a table with rows are both there.
  await page.goto(`${prefect}/v2/artifacts/artifact/${artifactId}`);
  const snapshot = await page.waitForFunction(() => {
    const heading = [...document.querySelectorAll('h1')].map((h) => h.innerText.trim());
    const table = document.querySelector('table');
    if (!heading.some((t) => t.startsWith('npd run')) || !table) return null;
    const rows = [...table.querySelectorAll('tr')].map((tr) =>
      [...tr.querySelectorAll('th, td')].map((c) => c.innerText.trim()));
    return rows.length > 1 ? { heading, rows } : null;
  });
  const { heading, rows } = await snapshot.jsonValue();
  await page.screenshot({ path: `${shots}/summary.png`, fullPage: true });
  log('summary', { heading, rows });

  await page.goto(`${mlflow}/#/experiments`);
  await page.getByRole('link', { name: experiment, exact: true }).first().waitFor();
  await page.screenshot({ path: `${shots}/mlflow.png` });
  log('mlflow', { experiment });
} finally {
  await browser.close();
}
