"""`fedbrats privacy audit` and `fedbrats privacy plan`: the tables and the figure; the checks are in
`fedbrats.client.audit` (which returns data)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedbrats.client.audit import SiteAudit, audit_run, plan_rows
from fedbrats.server.client_dp_audit import ClientDPAudit, audit_client_dp

__all__ = ["plot_epsilon", "run_audit", "run_client_plan", "run_plan"]


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=160)  # logs and pipes: do not squeeze the tables


def _site_table(audit: SiteAudit) -> Table:
    kinds = {c.row.accountant == "rdp" for c in audit.rounds}
    independent = "RDP/PLD" if len(kinds) > 1 else "RDP" if True in kinds else "PLD"
    accountant = "/".join(sorted({c.row.accountant for c in audit.rounds})) or "-"
    key = f"key {audit.key_fingerprint[:16]}" if audit.key_fingerprint else "no key"
    table = Table(
        title=f"site {audit.site}: {audit.path} ({key})",
        caption=(
            f"eps: recorded ({accountant}); Opacus: recomputed from the history; {independent}: dp_accounting"
        ),
    )
    for name in ("row", "run:round", "sigma", "q", "steps", "total", "delta", "eps", "Opacus", independent,
                 "left", "problems"):  # fmt: skip
        table.add_column(name, justify="left" if name in ("run:round", "problems") else "right")
    for c in audit.rounds:
        r = c.row
        table.add_row(str(r.seq), f"{r.run_id}:{r.round}", f"{r.noise_multiplier:.4f}", f"{r.sample_rate:.4f}",
                      str(r.steps), str(c.total_steps), f"{r.delta:.2g}", f"{r.epsilon:.4f}", f"{c.recomputed:.4f}",
                      f"{c.independent:.4f}", f"{c.budget - r.epsilon:.3f}",
                      "[red]" + "; ".join(c.problems) + "[/red]" if c.problems else "ok")  # fmt: skip
    return table


def _client_dp_table(audit: ClientDPAudit) -> Table:
    table = Table(title=f"client-level DP at the server: {audit.run_dir} (delta {audit.delta:.2g}; the unit is a site)",
                  caption="eps: recorded by the server; RDP: recomputed from the round's noise multiplier, "
                          "sample rate and releases")  # fmt: skip
    for name in ("round", "releases", "z", "updates", "noise std", "eps", "RDP", "problems"):
        table.add_column(name, justify="left" if name == "problems" else "right")
    for r in audit.rounds:
        table.add_row(str(r.round), str(r.releases), f"{r.noise_multiplier:.4f}", str(r.updates), f"{r.noise_std:.4g}",
                      f"{r.recorded:.4f}", f"{r.recomputed:.4f}",
                      "[red]" + "; ".join(r.problems) + "[/red]" if r.problems else "ok")  # fmt: skip
    return table


def plot_epsilon(audits: Sequence[SiteAudit], out_png: Path, budget: float | None = None,
                 client: ClientDPAudit | None = None) -> Path:  # fmt: skip
    """Epsilon after each round the site trained, one line per site, budgets dashed; client-level DP in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for audit in audits:
        rows = [c.row for c in audit.rounds]
        if not rows:
            continue
        one_run = len({r.run_id for r in rows}) == 1
        xs = [r.round for r in rows] if one_run else list(range(1, len(rows) + 1))
        (line,) = ax.plot(xs, [r.epsilon for r in rows], marker="o", label=audit.site)
        if audit.budget is not None:
            ax.axhline(audit.budget, linestyle="--", color=line.get_color(), linewidth=0.8)
    if client is not None and client.rounds:
        ax.plot([r.round for r in client.rounds], [r.recomputed for r in client.rounds], marker="s", color="black",
                label="client-level (a whole site)")  # fmt: skip
    ax.set_xlabel("round (rounds trained, when the ledger holds several runs)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("epsilon (DP-SGD: per patient; client-level: per site)")
    ax.set_title("Privacy spent per site" + (f" (budget {budget:g})" if budget is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def run_audit(path: Path, *, budget: float | None = None, out_png: Path | None = None,
              history: Path | None = None) -> int:  # fmt: skip
    """Print per-site tables, every failure (site, row, what) and a summary; 1 when anything fails.

    A run with client-level DP gets its own table first; a run with only that has no site ledger."""
    console = _console()
    client = audit_client_dp(Path(path), budget=budget) if Path(path).is_dir() else None
    if client is not None:
        console.print(_client_dp_table(client))
        for failure in client.failures:
            console.print(f"[red]FAIL client-level DP: {failure}[/red]", highlight=False, soft_wrap=True)
        console.print(f"client-level epsilon {client.epsilon:.4f} at delta {client.delta:.2g} after "
                      f"{len(client.rounds)} released round(s): " + ("ok" if client.ok else "[red]FAILED[/red]"))  # fmt: skip
    try:
        run = audit_run(Path(path), budget=budget, history=history)
    except FileNotFoundError:
        if client is None:
            raise
        if out_png is not None:
            console.print(f"epsilon over rounds: {plot_epsilon([], out_png, budget, client)}")
        return 0 if client.ok else 1
    for audit in run.sites:
        console.print(_site_table(audit))
        for note in audit.notes:
            console.print(f"{audit.site}: note: {note}")
    summary = Table(
        title="privacy budget per site",
        caption=(
            f"checked against the server's history {run.history}"
            if run.history
            else "no server history found: chain, signatures and arithmetic checked, not the rows the server saw"
        ),
    )
    for name in ("site", "rounds trained", "server rounds", "epsilon", "delta", "budget", "left", "status"):
        summary.add_column(name)
    for a in run.sites:
        status = "[red]over budget[/red]" if a.exceeded else "ok"
        status += "" if a.consistent else ", [red]ledger inconsistent[/red]"
        delta = f"{a.rounds[-1].row.delta:.2g}" if a.rounds else "-"
        left = "-" if a.budget is None else f"{a.budget - a.epsilon:.3f}"
        summary.add_row(a.site, str(len(a.rounds)), "-" if a.server_rounds is None else str(a.server_rounds),
                        f"{a.epsilon:.4f}", delta, "-" if a.budget is None else f"{a.budget:g}", left, status)  # fmt: skip
    console.print(summary)
    for failure in run.failures():
        console.print(f"[red]FAIL {failure}[/red]", highlight=False, soft_wrap=True)
    if out_png is not None:
        console.print(f"epsilon over rounds: {plot_epsilon(run.sites, out_png, budget, client)}")
    return 0 if run.ok and (client is None or client.ok) else 1


def run_plan(
    cases: int, batch: int, rounds: int, local_epochs: int, epsilon: float, delta: float | None = None, *,
    local_steps: int = 0, accountant: str = "rdp",
) -> int:  # fmt: skip
    """Print the noise multiplier a site needs to stay within `epsilon` over `rounds` rounds."""
    table = Table(title=f"DP-SGD plan for a site of {cases} cases")
    table.add_column("setting")
    table.add_column("value", justify="right")
    for name, value in plan_rows(cases, batch, rounds, local_epochs, epsilon, delta, local_steps=local_steps,
                                 accountant=accountant):  # fmt: skip
        table.add_row(name, value)
    _console().print(table)
    return 0


def run_client_plan(sites: int, rounds: int, epsilon: float, delta: float | None = None,
                    clipping_norm: float | None = None) -> int:  # fmt: skip
    """Print the server noise multiplier that keeps every site within `epsilon` over `rounds` rounds."""
    from fedbrats.strategies.client_dp import client_plan_rows

    table = Table(title=f"client-level DP plan for {sites} sites")
    table.add_column("setting")
    table.add_column("value", justify="right")
    for name, value in client_plan_rows(sites, rounds, epsilon, 1e-5 if delta is None else delta, clipping_norm):
        table.add_row(name, value)
    _console().print(table)
    return 0
