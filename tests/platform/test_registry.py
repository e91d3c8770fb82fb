"""The Pareto-aware registry against a real `mlflow server` on 127.0.0.1, with real logged models.

One server per module. Five trials (`t0`..`t4`) each log a tiny routing network to a run of their
own; each test writes a pareto.json with `pareto.analysis.write_front` and registers it under a
registered model name of its own. What the registry wrote is read back with MLflow's client.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from dynroute.models import NetworkConfig, Route, build_network
from dynroute.models.routing_space import Path as RoutePath
from dynroute.platform.evaluate.plots import plot_taken_route, taken_route
from dynroute.platform.evaluate.predict import PredictError, predict
from dynroute.platform.evaluate.prediction_files import voc_palette
from dynroute.platform.pareto.analysis import Point, summarize, write_front
from dynroute.platform.registry.front import RegistryError
from dynroute.platform.registry.register import register_front
from dynroute.platform.registry.selection import select_version
from dynroute.platform.tracking.model_logging import load_network
from dynroute.platform.tracking.server import MlflowServer
from dynroute.platform.tracking.tracker import Tracker

TRIALS = 5
server_test = pytest.mark.slow  # they share one MLflow server (~15 s to start)
RESOLUTION = [256, 512]


TINY = NetworkConfig(layers=4, base_channels=4, num_classes=19)


def tiny_network(seed: int = 0, classes: int = 19):
    torch.manual_seed(seed)
    return build_network(NetworkConfig(layers=4, base_channels=4, num_classes=classes)).eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(root=tmp_path_factory.mktemp("mlflow")) as running:
        yield running


@pytest.fixture(scope="module")
def run_ids(server: MlflowServer) -> dict[str, str]:
    """Trial id → the MLflow run that logged its model (as `model`, like training does)."""
    tracker = Tracker(uri=server.uri, experiment="registry-test")
    ids = {}
    for i in range(TRIALS):
        with tracker.run(run_name=f"trial-{i}") as run_id:
            tracker.log_network(tiny_network(i), TINY)
        ids[f"t{i}"] = run_id
    return ids


@pytest.fixture
def client(server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def trial(trial_id: str, miou: float, gflops: float, run_ids: dict[str, str], *,
          dataset: str = "cityscapes", study: str = "study-a") -> Point:
    """A point with the trial record the pareto stage writes."""
    number = int(trial_id[1:])
    run_id = run_ids[trial_id]
    lambda2, mu = 0.1 * (number + 1), 0.05 * number
    meta = {"number": number, "study": study, "state": "COMPLETE",
            "params": {"train.lambda2": lambda2, "train.mu": mu}, "lambda2": lambda2, "mu": mu,
            "iterations": 20, "gflops_max": gflops * 1.25, "gflops_min": gflops * 0.75,
            "gflops_p50": gflops, "gflops_p90": gflops * 1.2, "cost_resolution": RESOLUTION,
            "checkpoint": f"artifacts/tune/{trial_id}", "mlflow_run_id": run_id,
            "model_uri": f"runs:/{run_id}/model", "data_hash": "d" * 64,
            "git_commit": "c" * 40, "dataset": dataset}
    return Point(trial_id, miou, gflops, meta)


# The first front: t0 (cheap), t1, t2 (accurate); t3 is dominated by t1.
FIRST = {"t0": (0.50, 2.0), "t1": (0.60, 5.0), "t2": (0.64, 12.0), "t3": (0.55, 8.0)}


def write_pareto(path: Path, figures: dict[str, tuple[float, float]], run_ids) -> Path:
    points = [trial(t, miou, gflops, run_ids) for t, (miou, gflops) in figures.items()]
    write_front(path, path.with_suffix(".csv"), points)
    return path


def versions_by_trial(client: MlflowClient, name: str) -> dict[str, object]:
    return {v.tags["trial"]: v for v in client.search_model_versions(f"name='{name}'")}


# ---------------------------------------------------------------------------------------------
# Registration


@server_test
def test_register_front_tags_versions_and_sets_aliases(server, run_ids, client, tmp_path):
    pareto = write_pareto(tmp_path / "pareto.json", FIRST, run_ids)
    state = register_front(pareto, tracking_uri=server.uri, name="tags-{dataset}")

    assert state.name == "tags-cityscapes"
    versions = versions_by_trial(client, state.name)
    assert sorted(versions) == ["t0", "t1", "t2"]  # the dominated t3 is not registered
    assert sorted(state.created) == sorted(v.version for v in versions.values())
    for t, version in versions.items():
        miou, gflops = FIRST[t]
        tags = version.tags
        assert version.run_id == run_ids[t]  # registered from the trial's runs:/ URI
        assert float(tags["miou"]) == miou and float(tags["gflops_mean"]) == gflops
        assert float(tags["gflops_max"]) == gflops * 1.25
        assert float(tags["gflops_min"]) == gflops * 0.75
        assert tags["cost_resolution"] == "256x512"
        number = int(t[1:])
        assert float(tags["lambda2"]) == pytest.approx(0.1 * (number + 1))
        assert float(tags["mu"]) == pytest.approx(0.05 * number)
        assert json.loads(tags["params"]) == {"train.lambda2": float(tags["lambda2"]),
                                              "train.mu": float(tags["mu"])}
        assert tags["data_hash"] == "d" * 64 and tags["git_commit"] == "c" * 40
        assert tags["study"] == "study-a" and tags["trial"] == t
        assert tags["pareto_rank"] == "0" and tags["pareto"] == "true"

    summary = summarize([trial(t, m, g, run_ids) for t, (m, g) in FIRST.items()])
    aliases = client.get_registered_model(state.name).aliases
    v = {t: version.version for t, version in versions.items()}
    assert aliases["best-miou"] == v["t2"]
    assert aliases["min-gflops"] == v["t0"]
    assert aliases["knee"] == v[summary.knee.id]
    # Automatic edges: the 1-2-5 series within [2, 12): 2, 5, 10.
    assert state.automatic_edges and state.budget_edges == (2.0, 5.0, 10.0)
    assert {a: n for a, n in aliases.items() if a.startswith("le-")} == {
        "le-2g": v["t0"], "le-5g": v["t1"], "le-10g": v["t1"]}
    assert state.aliases == {a: str(n) for a, n in aliases.items()}

    description = client.get_registered_model(state.name).description
    assert "study-a" in description and "3 models" in description and "knee" in description
    summary_json = json.loads(json.dumps(state.to_dict()))
    assert [row["trial"] for row in summary_json["versions"]] == ["t0", "t1", "t2"]
    assert set(summary_json["versions"][2]["aliases"]) == {"best-miou"} | (
        {"knee"} if summary.knee.id == "t2" else set())
    # The alias serves the real logged model, its weights checked against the version's tag.
    loaded, record = load_network(f"models:/{state.name}@min-gflops", tracking_uri=server.uri)
    assert loaded.num_classes == 19 and loaded.layers == 4
    assert record.sha256 == client.get_model_version_by_alias(
        state.name, "min-gflops").tags["weights_sha256"]


@server_test
def test_registering_twice_registers_nothing_new(server, run_ids, client, tmp_path):
    pareto = write_pareto(tmp_path / "pareto.json", FIRST, run_ids)
    first = register_front(pareto, tracking_uri=server.uri, name="twice")
    before = {v.version: (v.tags, v.last_updated_timestamp)
              for v in client.search_model_versions("name='twice'")}
    described = client.get_registered_model("twice")

    second = register_front(pareto, tracking_uri=server.uri, name="twice")
    after = {v.version: (v.tags, v.last_updated_timestamp)
             for v in client.search_model_versions("name='twice'")}
    assert second.created == [] and second.left_front == [] and second.returned == []
    assert after == before  # same versions, tags untouched
    assert second.aliases == first.aliases
    model = client.get_registered_model("twice")
    assert model.description == described.description
    assert model.last_updated_timestamp == described.last_updated_timestamp


@server_test
def test_concurrent_registrations_end_with_one_version_per_trial(server, run_ids, client,
                                                                 tmp_path):
    """Nothing locks the registry: calls that list the versions at the same time all create
    theirs. Afterwards each run keeps its oldest version and every call agrees on it."""
    import threading

    pareto = write_pareto(tmp_path / "pareto.json", FIRST, run_ids)
    calls = 4
    barrier = threading.Barrier(calls)
    states, errors = [], []

    def register() -> None:
        barrier.wait()
        try:
            states.append(register_front(pareto, tracking_uri=server.uri, name="raced"))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    versions = client.search_model_versions("name='raced'")
    by_run: dict[str, list[int]] = {}
    for version in versions:
        by_run.setdefault(version.run_id, []).append(int(version.version))
    assert sorted(by_run) == sorted(run_ids[t] for t in ("t0", "t1", "t2")), "the front only"
    assert all(len(v) == 1 for v in by_run.values()), f"one version per run: {by_run}"
    assert sum(len(state.created) for state in states) == 3, "each version counted once"
    final = {a: str(v) for a, v in client.get_registered_model("raced").aliases.items()}
    for state in states:
        assert {v.version for v in state.versions} == {str(v[0]) for v in by_run.values()}
    assert states[-1].aliases == final
    assert set(final.values()) <= {str(v[0]) for v in by_run.values()}


@server_test
def test_a_new_front_moves_aliases_and_retags_leavers_without_deleting(server, run_ids, client,
                                                                       tmp_path):
    name = "moving"
    register_front(write_pareto(tmp_path / "one.json", FIRST, run_ids), tracking_uri=server.uri,
                   name=name)
    v = {t: version.version for t, version in versions_by_trial(client, name).items()}
    client.set_registered_model_alias(name, "production", v["t2"])  # set by hand: not managed

    # t4 dominates t2 (cheaper and more accurate): t2 leaves the front, t4 takes best-miou.
    second = FIRST | {"t4": (0.70, 11.0)}
    state = register_front(write_pareto(tmp_path / "two.json", second, run_ids),
                           tracking_uri=server.uri, name=name)
    versions = versions_by_trial(client, name)
    v4 = versions["t4"].version
    assert state.created == [v4] and state.left_front == [v["t2"]]
    assert versions["t2"].tags["pareto"] == "false"
    assert versions["t2"].tags["pareto_rank"] == "1"
    assert client.get_model_version(name, v["t2"]).version == v["t2"]  # still there
    aliases = client.get_registered_model(name).aliases
    assert aliases["best-miou"] == v4
    managed = {a for a, n in aliases.items() if n == v["t2"] and a != "production"}
    assert managed == set()  # the leaver lost every registry alias
    assert aliases["production"] == v["t2"]  # a hand-set alias is left alone, with a warning
    assert any("production" in w for w in state.warnings)
    assert [r.pareto for r in state.versions] == [True, True, True, False]

    # Back to the first front: t2 returns as the same version, t4 leaves.
    state = register_front(write_pareto(tmp_path / "three.json", FIRST, run_ids),
                           tracking_uri=server.uri, name=name)
    versions = versions_by_trial(client, name)
    assert state.created == [] and state.returned == [v["t2"]] and state.left_front == [v4]
    assert versions["t2"].version == v["t2"] and versions["t2"].tags["pareto"] == "true"
    assert versions["t2"].tags["pareto_rank"] == "0"
    assert versions["t4"].tags["pareto"] == "false"
    assert versions["t4"].tags["pareto_rank"] == "null"  # not among this file's points
    assert client.get_registered_model(name).aliases["best-miou"] == v["t2"]
    assert len(client.search_model_versions(f"name='{name}'")) == 4


@server_test
def test_budget_edges_name_buckets_and_stale_buckets_go(server, run_ids, client, tmp_path):
    pareto = write_pareto(tmp_path / "pareto.json", FIRST, run_ids)
    state = register_front(pareto, tracking_uri=server.uri, name="buckets",
                           budget_edges=(6, 1.0, 100.0, 3.0))
    v = {t: version.version for t, version in versions_by_trial(client, "buckets").items()}
    buckets = {a: n for a, n in state.aliases.items() if a.startswith("le-")}
    assert not state.automatic_edges and state.budget_edges == (1.0, 3.0, 6.0, 100.0)
    assert buckets == {"le-3g": v["t0"], "le-6g": v["t1"], "le-100g": v["t2"]}  # 1: none fits

    state = register_front(pareto, tracking_uri=server.uri, name="buckets",
                           budget_edges=(2.5,))
    aliases = client.get_registered_model("buckets").aliases
    assert {a for a in aliases if a.startswith("le-")} == {"le-2p5g"}
    assert aliases["le-2p5g"] == v["t0"] and aliases["best-miou"] == v["t2"]
    with pytest.raises(RegistryError, match="positive"):
        register_front(pareto, tracking_uri=server.uri, name="buckets", budget_edges=(-1.0,))


# ---------------------------------------------------------------------------------------------
# Selection


@server_test
def test_select_the_best_version_under_a_budget(server, run_ids, client, tmp_path):
    register_front(write_pareto(tmp_path / "pareto.json", FIRST, run_ids),
                   tracking_uri=server.uri, name="select")
    v = {t: version.version for t, version in versions_by_trial(client, "select").items()}

    chosen = select_version(tracking_uri=server.uri, name="select", max_gflops=6.0)
    assert chosen is not None and chosen.version == v["t1"]
    assert chosen.uri == f"models:/select/{v['t1']}"
    assert (chosen.miou, chosen.gflops_mean) == (0.60, 5.0)
    assert (chosen.gflops_min, chosen.gflops_max) == (3.75, 6.25)
    assert chosen.cost_resolution == "256x512" and chosen.trial == "t1"
    assert "le-5g" in chosen.aliases
    assert select_version(tracking_uri=server.uri, name="select",
                          max_gflops=1000).version == v["t2"]
    # An exact budget fits; a minimum mIoU narrows the choice.
    assert select_version(tracking_uri=server.uri, name="select", max_gflops=2.0,
                          ).version == v["t0"]
    assert select_version(tracking_uri=server.uri, name="select", max_gflops=1000,
                          min_miou=0.61).version == v["t2"]
    assert select_version(tracking_uri=server.uri, name="select", max_gflops=6.0,
                          min_miou=0.62) is None
    assert select_version(tracking_uri=server.uri, name="select", max_gflops=1.9) is None
    # Only versions on the front count.
    client.set_model_version_tag("select", v["t2"], "pareto", "false")
    assert select_version(tracking_uri=server.uri, name="select",
                          max_gflops=1000).version == v["t1"]
    with pytest.raises(RegistryError, match="dynroute register"):
        select_version(tracking_uri=server.uri, name="never-registered", max_gflops=1.0)
    with pytest.raises(RegistryError, match="numbers"):
        select_version(tracking_uri=server.uri, name="select", max_gflops=math.nan)


# ---------------------------------------------------------------------------------------------
# pareto.json validation


@server_test
def test_bad_pareto_json_gives_a_clear_error(server, run_ids, tmp_path):
    """register_front checks the file and the name (`registry.front`, whose checks
    test_front.py covers one by one) before it writes anything."""
    good = json.loads(write_pareto(tmp_path / "pareto.json", FIRST, run_ids).read_text())

    missing = tmp_path / "absent.json"
    with pytest.raises(RegistryError, match=r"absent\.json does not exist.*pareto"):
        register_front(missing, tracking_uri=server.uri, name="bad")
    no_uri = json.loads(json.dumps(good))
    del no_uri["front"][1]["meta"]["model_uri"]
    path = tmp_path / "no_uri.json"
    path.write_text(json.dumps(no_uri))
    with pytest.raises(RegistryError,
                       match=r"no_uri\.json: front\[1\] \(trial 't1'\) has no key "
                             r"'meta\.model_uri'"):
        register_front(path, tracking_uri=server.uri, name="bad")
    with pytest.raises(RegistryError, match="placeholder"):
        register_front(good, tracking_uri=server.uri, name="x-{study}")
    with pytest.raises(MlflowException):  # nothing named "bad" was created along the way
        MlflowClient(server.uri, registry_uri=server.uri).get_registered_model("bad")


# ---------------------------------------------------------------------------------------------
# The route one image took, and prediction on image files


def test_taken_route_follows_features_through_a_skipped_cell(tmp_path):
    route = Route.full(4)
    gates = {node: torch.ones(1, len(route.paths_of(node))) for node in route.cells}
    gates[(-1, 0)] = torch.tensor([[1.0, 0.0]])  # init: keep only
    gates[(0, 0)] = torch.tensor([[0.0, 0.0]])  # every path closed: skipped, input passed on
    taken = taken_route(route, gates, threshold=1e-4)
    assert taken.skipped == {(0, 0)}
    assert taken.passed_on == {RoutePath(0, 0, "keep")}
    assert (0, 1) not in taken.reached  # only the closed 0:0:down led there
    # 1:0 gets 0:0's input; 1/32 is reached only through 1:1, which nothing fed.
    assert (1, 0) in taken.reached and (3, 3) not in taken.reached
    assert taken.decoder_scales == (0, 1, 2)
    assert RoutePath(-1, 0, "down") not in taken.open_paths
    assert taken.as_route() is None  # the open paths are not a valid Route
    full = taken_route(route, {n: torch.ones(1, len(route.paths_of(n))) for n in route.cells},
                       threshold=1e-4)
    assert full.as_route().paths == route.paths and not full.skipped
    with pytest.raises(ValueError, match="columns"):
        taken_route(route, gates | {(0, 0): torch.zeros(1, 5)}, threshold=1e-4)

    a = plot_taken_route(taken, tmp_path / "skipped.png")
    b = plot_taken_route(full, tmp_path / "full.png")
    with Image.open(a) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert a.read_bytes() != b.read_bytes()


def write_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    a, b = folder / "street.png", folder / "field.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)).save(b, quality=90)
    return [a, b]


def test_predict_writes_colour_masks_routes_and_costs(tmp_path):
    from cityscapesscripts.helpers.labels import trainId2label

    network = tiny_network().train()
    images = write_images(tmp_path / "in")
    result = predict(network, images, tmp_path / "out", dataset="cityscapes", model="tiny")
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["model"] == "tiny" and [r["image"] for r in summary["images"]] == [
        str(p) for p in images]
    colours = {tuple(trainId2label[k].color) for k in range(19)}
    for row, path, (h, w) in zip(result.images, images, [(40, 56), (33, 47)], strict=True):
        assert (row.height, row.width) == (h, w)
        with Image.open(tmp_path / "out" / row.mask) as mask:
            assert mask.size == (w, h) and mask.mode == "RGB"
            used = {tuple(c) for c in np.asarray(mask).reshape(-1, 3)}
        assert used <= colours
        assert (tmp_path / "out" / row.route).stat().st_size > 0
        assert row.mask == f"{path.stem}_mask.png" and row.route == f"{path.stem}_route.png"
        # Real cost of the route taken, at the image's own size.
        network.eval()
        with torch.inference_mode():
            image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]
                                     .copy()).permute(2, 0, 1).float()
            out = network(network_input(image))
        assert row.gflops == pytest.approx(float(network.cost_model(h, w).real(out.gates)[0])
                                           / 1e9)
        taken = taken_route(network.route, out.gates, threshold=network.closed_threshold)
        assert row.open_paths == tuple(str(p) for p in sorted(taken.open_paths))
        assert row.skipped_cells == tuple(f"{r}:{k}" for r, k in sorted(taken.skipped))
        assert row.valid_route == (taken.as_route() is not None)
        assert row.open_paths and row.gflops > 0
        network.train()
    assert network.training  # its mode is restored


def network_input(bgr: torch.Tensor) -> torch.Tensor:
    from dynroute.models import normalize_bgr

    return normalize_bgr(bgr).unsqueeze(0)


def test_predict_voc_palette_and_errors(tmp_path):
    images = write_images(tmp_path / "in")
    result = predict(tiny_network(classes=21), images[:1], tmp_path / "voc", dataset="voc")
    with Image.open(tmp_path / "voc" / result.images[0].mask) as mask:
        assert mask.mode == "P" and mask.getpalette()[:63] == voc_palette()[:63]
        assert int(np.asarray(mask).max()) < 21

    network = tiny_network()
    missing = tmp_path / "in" / "nowhere.png"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png does not exist"):
        predict(network, [images[0], missing], tmp_path / "fail", dataset="cityscapes")
    assert not (tmp_path / "fail").exists()  # checked before any work
    text = tmp_path / "in" / "notes.png"
    text.write_text("not an image")
    with pytest.raises(PredictError, match=r"notes\.png is not a PNG or JPEG"):
        predict(network, [text], tmp_path / "fail", dataset="cityscapes")
    with pytest.raises(PredictError, match="19 classes but voc has 21"):
        predict(network, images, tmp_path / "fail", dataset="voc")
    # Two images with the same stem do not overwrite each other.
    twin = tmp_path / "other" / "street.png"
    twin.parent.mkdir()
    twin.write_bytes(images[0].read_bytes())
    result = predict(network, [images[0], twin], tmp_path / "twins", dataset="cityscapes")
    assert [r.mask for r in result.images] == ["street_mask.png", "street-2_mask.png"]
