"""The `dynroute model` commands: a network's parameters and cost by part (`summary`), and the
named static routes (`route`). cli.py adds them to the `model` group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dynroute.models import NetworkConfig, Route, RouteError, build_network
from dynroute.models.cell import CELL_OPS
from dynroute.models.gate import GATE_KINDS
from dynroute.models.static_routes import STATIC_ROUTES
from dynroute.models.summary import summarize


def parse_size(text: str) -> tuple[int, int]:
    """'1024x2048' → (1024, 2048)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"{text!r} is not HxW with positive integers, e.g. 1024x2048")
    return int(parts[0]), int(parts[1])


def load_route(spec: str, layers: int) -> Route:
    """A named static route built for `layers` rows, or a route file (JSON/YAML)."""
    if spec in STATIC_ROUTES:
        return STATIC_ROUTES[spec](layers)
    path = Path(spec)
    if not path.exists():
        raise typer.BadParameter(f"{spec!r} is neither a named route "
                                 f"({', '.join(STATIC_ROUTES)}) nor an existing file")
    try:
        return Route.load(path)
    except RouteError as err:
        raise typer.BadParameter(str(err)) from None


def model_summary(
    layers: Annotated[int, typer.Option(help="Rows L of the routing space (>= 4).")] = 16,
    cell: Annotated[str, typer.Option(help=f"Cell: {', '.join(CELL_OPS)}.")] = "sep2",
    gate: Annotated[str | None, typer.Option(
        help=f"Gate: {', '.join(GATE_KINDS)}. Default: tanh, or fixed with --route.")] = None,
    small_gate: Annotated[bool, typer.Option(help="Gates read ×0.25 inputs.")] = False,
    classes: Annotated[int, typer.Option(help="Output classes.")] = 19,
    base_channels: Annotated[int, typer.Option(help="C₀ (64 in the paper).")] = 64,
    psp: Annotated[bool, typer.Option(help="Add the PSP head.")] = False,
    size: Annotated[str, typer.Option(help="Declared input resolution HxW.")] = "1024x2048",
    route: Annotated[str | None, typer.Option(
        help=f"A named route ({', '.join(STATIC_ROUTES)}) or a route file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Parameters and GFLOPs (every path of the network or route open), by part."""
    height, width = parse_size(size)
    chosen = load_route(route, layers) if route else None
    if chosen is not None:
        layers = chosen.layers
    gate = gate or ("fixed" if route else "tanh")
    try:
        config = NetworkConfig(layers=layers, cell=cell, gate=gate, small_gate=small_gate,
                               num_classes=classes, base_channels=base_channels, psp=psp,
                               route=chosen)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    network = build_network(config)
    report = summarize(network, height, width)
    report["config"] = {"layers": config.layers, "cell": config.cell, "gate": config.gate,
                        "small_gate": config.small_gate, "classes": config.num_classes,
                        "base_channels": config.base_channels, "psp": config.psp,
                        "route": chosen.name if chosen else "full"}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    c = report["config"]
    typer.echo(f"dynroute network: L={c['layers']} cell={c['cell']} gate={c['gate']} "
               f"small_gate={c['small_gate']} classes={c['classes']} C0={c['base_channels']} "
               f"psp={c['psp']} route={c['route']}")
    typer.echo(f"cost at {height}x{width}, every path open (multi-adds):\n")
    typer.echo(f"{'part':<12}{'params':>14}{'GFLOPs':>12}")
    for part, row in report["breakdown"].items():
        note = "  (not counted, as in the paper)" if not row["counted"] else ""
        typer.echo(f"{part:<12}{row['params']:>14,}{row['gflops']:>12.2f}{note}")
    typer.echo(f"{'total':<12}{report['params']:>14,}{report['gflops']:>12.2f}")
    typer.echo(f"\nexpected cost with every alpha = 1 (C_all of the budget loss): "
               f"{report['expected_gflops']:.2f} GFLOPs")
    if chosen is not None:
        typer.echo(f"\nroute {chosen.name}: {chosen.description}\n{chosen.render()}")


def model_route(
    name: Annotated[str, typer.Argument(help=f"One of {', '.join(STATIC_ROUTES)}.")],
    layers: Annotated[int, typer.Option(help="Rows L of the routing space.")] = 16,
    out: Annotated[Path | None, typer.Option(help="Write the route here (.json or .yaml).")] = None,
) -> None:
    """Show a named static route on the lattice, or write it as a route file."""
    if name not in STATIC_ROUTES:
        names = ", ".join(STATIC_ROUTES)
        raise typer.BadParameter(f"unknown route {name!r}; choose one of {names}")
    try:
        chosen = STATIC_ROUTES[name](layers)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if out is not None:
        chosen.save(out)
        typer.echo(f"wrote {out}")
        return
    typer.echo(f"{chosen.name} (L={chosen.layers}): {chosen.description}\n{chosen.render()}")
