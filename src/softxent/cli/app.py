"""The typer application: one function per command."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="softxent: softmax cross-entropy, softmax regression and its tools.")
console = Console()


@app.command()
def gradcheck(
    n: int = typer.Option(8, help="rows of random X"),
    d: int = typer.Option(5, help="features"),
    k: int = typer.Option(4, help="classes"),
    seed: int = typer.Option(0, help="random seed"),
    tol: float = typer.Option(1e-7, help="largest relative error that passes"),
) -> None:
    """Verify the seed's derivation numerically on random data and print what was checked."""
    from ..gradcheck import check_seed_derivation

    if min(n, d, k) < 1:
        raise typer.BadParameter(f"n, d and k must be >= 1; got n={n}, d={d}, k={k}")
    rows = check_seed_derivation(n=n, d=d, k=k, seed=seed)
    table = Table(title=f"softmax cross-entropy E = -(1/N) sum y.log softmax(X Theta^T + b)   "
                        f"(N={n}, D={d}, K={k}, seed={seed})")
    for col in ("derivative", "seed's formula", "vs finite differences", "vs closed form", "ok"):
        table.add_column(col)
    ok_all = True
    for r in rows:
        ok = r.fd_error < tol and r.closed_form_error < tol
        ok_all &= ok
        table.add_row(r.name, r.formula, f"{r.fd_error:.2e}", f"{r.closed_form_error:.2e}",
                      "yes" if ok else "NO")
    console.print(table)
    console.print("The seed's derivation holds." if ok_all else "[red]Gradient check FAILED.[/red]")
    raise typer.Exit(0 if ok_all else 1)


@app.callback()
def _root() -> None:
    """softxent: softmax cross-entropy, softmax regression and its tools."""
