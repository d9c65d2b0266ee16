"""``npd models``: bring a model into npd's form by hand (a GGUF file as an HF checkpoint) and
make a student from a teacher by depth pruning. Commands and rendering only; the work is in
``npd_core.modelio``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

models_app = typer.Typer(no_args_is_help=True, help="Convert a GGUF file or prune a teacher.")
err = Console(stderr=True)


@models_app.command("import")
def import_(
    gguf: Annotated[Path, typer.Argument(help="a .gguf model file (any quantisation)")],
    out: Annotated[Path, typer.Argument(help="folder to write the HF checkpoint to")],
) -> None:
    """Convert a GGUF file into a plain HF checkpoint (dequantised to float32, with its
    tokenizer), as a run that names the file does by itself."""
    from npd_core.modelio import import_gguf

    path = import_gguf(gguf, out)
    err.print(f"wrote {path} (HF checkpoint of {gguf.name})")


@models_app.command()
def prune(
    teacher: Annotated[Path, typer.Argument(help="the teacher's HF checkpoint folder")],
    out: Annotated[Path, typer.Argument(help="folder to write the student to")],
    layers: Annotated[int, typer.Option("--layers", help="decoder layers the student keeps")],
    pick: Annotated[
        str,
        typer.Option(
            help="which layers: first (the first K), stride (every n/K-th) or last-k",
        ),
    ] = "first",
) -> None:
    """Write a depth-pruned student: K of the teacher's decoder layers, its embeddings, final
    norm and head (tied as in the teacher), loadable by plain ``from_pretrained``."""
    from npd_core.modelio import prune as prune_model

    path = prune_model(teacher, out, layers, pick)  # type: ignore[arg-type]  # checked there
    err.print(f"wrote {path} ({layers} decoder layers of {teacher.name}, picked: {pick})")
