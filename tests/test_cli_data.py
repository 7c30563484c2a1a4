"""The ``facefl`` command: ``data synth`` / ``data show`` and an end-to-end tiny ``baseline`` run."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import load_config
from common.data import contact_sheet as sheet
from common.data.cache import synth_config
from common.data.datadir import CONFIG_NAME, IMAGES_DIR, MEMBERS_NAME, NPZ_NAME, member_identities, open_data_dir
from common.data.dataset import FaceDataset
from common.data.sources import load_source
from common.data.sources.synthfaces.generator import SynthConfig, generate
from common.evaluation.global_model import probe_identity_mask
from common.evaluation.verification import verification_auc
from common.nn.checkpoint import load_checkpoint
from common.nn.face_model import FaceModel, ModelSpec
from common.split.manifest import Manifest
from common.train.loop import embed
from workflow.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing",
                                        "ignore:Optimal order is the largest alpha")

SYNTH = ["--identities", "6", "--images-per-identity", "3", "--image-size", "32"]


def _synth(out: Path, *extra: str) -> int:
    return main(["--no-progress", "data", "synth", "--out", str(out), *SYNTH, *extra])


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- data synth -----------------------------------------------------------------------------

def test_synth_is_byte_identical_across_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    exe = Path(sys.executable).with_name("facefl")  # the installed console script
    assert exe.is_file(), exe
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "123"}
    proc = subprocess.run([str(exe), "--no-progress", "data", "synth", "--out", str(a), *SYNTH, "--seed", "5"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"wrote 18 images of 6 identities to .* \(fingerprint [0-9a-f]{16}\)", proc.stdout)
    assert _synth(b, "--seed", "5") == 0
    capsys.readouterr()
    files_a, files_b = _tree(a), _tree(b)
    assert {NPZ_NAME, CONFIG_NAME, f"{IMAGES_DIR}/attributes.csv"} <= set(files_a)
    assert sum(name.endswith(".png") for name in files_a) == 18
    # The export uses plain names (<identity>/<index>.png) and a plain CSV that any CSV reader takes.
    assert all(re.fullmatch(rf"{IMAGES_DIR}/\d{{5}}/\d{{3}}\.png", name) for name in files_a if name.endswith(".png"))
    assert f"{IMAGES_DIR}/00005/002.png" in files_a
    rows = list(csv.DictReader(io.StringIO(files_a[f"{IMAGES_DIR}/attributes.csv"].decode())))
    assert len(rows) == 18 and list(rows[0]) == ["file", "gender", "group", "age", "smiling"]
    assert json.loads(files_a[f"{IMAGES_DIR}/groups.json"])["group_names"] == ["light", "medium", "brown", "dark"]
    assert set(files_a) == set(files_b)
    for name in files_a:
        assert files_a[name] == files_b[name], name
    # The npz cache holds exactly what the generator makes, and the export reads back to the same pixels.
    expected = generate(SynthConfig(num_identities=6, images_per_identity=3, image_size=32, seed=5))
    cached = open_data_dir(a)
    assert cached.fingerprint() == expected.fingerprint()
    exported = open_data_dir(a / IMAGES_DIR, image_size=32)
    assert len(exported) == 18
    assert sorted(map(bytes, exported.images.reshape(18, -1))) == sorted(map(bytes, expected.images.reshape(18, -1)))
    assert json.loads(files_a[CONFIG_NAME])["seed"] == 5


def test_synth_with_another_seed_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _synth(tmp_path / "a", "--seed", "1", "--no-export") == 0
    assert _synth(tmp_path / "b", "--seed", "2", "--no-export") == 0
    capsys.readouterr()
    a, b = FaceDataset.load_npz(tmp_path / "a" / NPZ_NAME), FaceDataset.load_npz(tmp_path / "b" / NPZ_NAME)
    assert a.fingerprint() != b.fingerprint()
    assert not np.array_equal(a.images, b.images)
    assert (tmp_path / "a" / NPZ_NAME).read_bytes() != (tmp_path / "b" / NPZ_NAME).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([NPZ_NAME, CONFIG_NAME])  # --no-export


def test_synth_refuses_to_overwrite_an_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert _synth(out, "--seed", "1") == 0
    before = _tree(out)
    capsys.readouterr()
    assert _synth(out, "--seed", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("facefl: error: ") and str(out / IMAGES_DIR) in err and "--overwrite" in err
    assert _tree(out) == before  # nothing was touched
    assert _synth(out, "--seed", "2", "--overwrite") == 0
    after = _tree(out)
    assert after[NPZ_NAME] != before[NPZ_NAME]
    assert set(after) == set(before)  # the old export was replaced, not mixed with the new one


def test_synth_accepts_a_range_of_images_per_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-progress", "data", "synth", "--out", str(tmp_path), "--identities", "8",
                 "--images-per-identity", "1-4", "--image-size", "32", "--no-export"]) == 0
    capsys.readouterr()
    counts = np.bincount(FaceDataset.load_npz(tmp_path / NPZ_NAME).identity)
    assert counts.size == 8 and counts.min() >= 1 and counts.max() <= 4


MEMBERS = ["--identities", "12", "--images-per-identity", "3", "--image-size", "32"]


def _synth_members(out: Path, *extra: str) -> int:
    return main(["--no-progress", "data", "synth", "--out", str(out), *MEMBERS, *extra])


def test_synth_members_writes_one_disjoint_imagefolder_per_member(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert _synth_members(out, "--members", "3", "--seed", "4") == 0
    assert f"wrote 36 images of 12 identities to {out} (3 members: {out / MEMBERS_NAME})" in capsys.readouterr().out
    # The member folders are the only sub-directories (a per-member simulation reads each as one member).
    assert sorted(p.name for p in out.iterdir()) == sorted([NPZ_NAME, CONFIG_NAME, MEMBERS_NAME,
                                                            "member-00", "member-01", "member-02"])
    population = FaceDataset.load_npz(out / NPZ_NAME)
    by_id = {str(sid).removeprefix("synth/"): i for i, sid in enumerate(population.sample_ids)}
    counts = json.loads((out / MEMBERS_NAME).read_text())
    assert counts == {f"member-0{k}": {"images": 12, "identities": 4} for k in range(3)}  # counts only, no names
    seen: list[set[str]] = []
    for k in range(3):
        member = out / f"member-0{k}"
        # Exactly what data.source = "imagefolder" with data.path = <member> reads, attributes included.
        ds = load_source("imagefolder", member, image_size=32)
        assert len(ds) == 12 and ds.num_identities == 4
        seen.append(set(ds.identity_names))
        rows = [by_id[str(sid).removesuffix(".png")] for sid in ds.sample_ids]
        assert np.array_equal(ds.images, population.images[rows])
        assert np.array_equal(ds.gender, population.gender[rows]) and np.array_equal(ds.group, population.group[rows])
        assert np.array_equal(ds.labels["smiling"], population.labels["smiling"][rows])
        assert ds.group_names == population.group_names
        assert open_data_dir(member).image_size == 32  # `data show` decodes a member at the size it was written at
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert set().union(*seen) == {f"{code:05d}" for code in range(12)}
    # The deal follows --seed, and is as even as the numbers allow.
    parts = [sorted(f"{int(c):05d}" for c in part) for part in member_identities(population.identity, 3, 4)]
    assert [sorted(names) for names in seen] == parts
    assert parts != [sorted(f"{int(c):05d}" for c in part) for part in member_identities(population.identity, 3, 5)]
    assert [p.size for p in member_identities(np.arange(10), 3, 0)] == [4, 3, 3]


@pytest.mark.parametrize(("args", "message"), [
    (["--members", "0"], "--members: expected 1 to 12"),
    (["--members", "13"], "--members: expected 1 to 12"),
    (["--members", "3", "--no-export"], "cannot be combined with --no-export"),
])
def test_synth_members_bad_values_exit_nonzero_naming_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 args: list[str], message: str) -> None:
    out = tmp_path / "data"
    assert _synth_members(out, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("facefl: error: ") and message in err, err
    assert not out.exists()  # refused before anything is written


def test_synth_members_replace_an_earlier_export_only_when_asked(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert _synth_members(out) == 0  # a whole-population export, images/
    capsys.readouterr()
    assert _synth_members(out, "--members", "4") == 2  # images/ would read as one more member
    assert f"{out / IMAGES_DIR}: already holds an export (use --overwrite" in capsys.readouterr().err
    assert _synth_members(out, "--members", "4", "--overwrite") == 0
    assert not (out / IMAGES_DIR).exists()
    before = _tree(out)
    capsys.readouterr()
    assert _synth_members(out, "--members", "3") == 2
    err = capsys.readouterr().err
    assert str(out / "member-00") in err and str(out / "member-03") in err and "--overwrite" in err, err
    assert _tree(out) == before  # nothing was touched
    assert _synth_members(out, "--members", "3", "--overwrite") == 0
    capsys.readouterr()
    # member-03 would read as a fourth member: it is removed, not left beside the new split.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["member-00", "member-01", "member-02"]
    assert sum(v["images"] for v in json.loads((out / MEMBERS_NAME).read_text()).values()) == 36


@pytest.mark.parametrize(("args", "field"), [
    (["--male-fraction", "1.5"], "male_fraction"),
    (["--group-proportions", "0.5,0.5"], "group_proportions"),
    (["--smiling-rate", "0.5,2"], "smiling_rate[male]"),
    (["--image-size", "8"], "image_size"),
    (["--identities", "0"], "num_identities"),
    (["--images-per-identity", "3-2"], "images_per_identity"),
])
def test_synth_bad_values_exit_nonzero_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        args: list[str], field: str) -> None:
    out = tmp_path / "data"
    assert main(["--no-progress", "data", "synth", "--out", str(out), "--identities", "4", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("facefl: error: ") and field in err, err
    assert not out.exists()  # validated before anything is written


@pytest.mark.parametrize(("args", "message"), [
    (["data", "synth", "--out", "x", "--images-per-identity", "many"], "expected N or MIN-MAX, got 'many'"),
    (["data", "synth", "--out", "x", "--smiling-rate", "half,half"], "expected comma-separated numbers"),
    (["data", "synth", "--identities", "3"], "the following arguments are required: --out"),
    (["data", "synth", "--out", "x", "--identities", "three"], "--identities: invalid int value: 'three'"),
    (["data"], "required: data_command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_with_usage_naming_the_option(capsys: pytest.CaptureFixture[str], args: list[str],
                                                         message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# --- data show ------------------------------------------------------------------------------

def test_show_writes_an_rgb_contact_sheet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert _synth(data, "--seed", "3", "--no-export") == 0
    capsys.readouterr()
    png = tmp_path / "sheets" / "faces.png"
    assert main(["data", "show", str(data), "--out", str(png), "--identities", "4", "--per-identity", "2"]) == 0
    assert capsys.readouterr().out == f"wrote {png}: 4 identities, up to 2 images each\n"  # all asked for: no notes
    assert png.stat().st_size > 0
    with Image.open(png) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        face = 32 * -(-sheet.MIN_FACE // 32)  # upscaled by an integer factor
        assert img.size == (sheet.PAD + 2 * (face + sheet.PAD), sheet.PAD + 4 * (face + sheet.CAPTION_HEIGHT + sheet.PAD))
        pixels = np.asarray(img)
    assert pixels.std() > 10  # faces were drawn, not just the white background
    # The sheet also works on an ImageFolder export and on the npz file itself.
    assert _synth(tmp_path / "exported", "--seed", "3") == 0
    for source in (tmp_path / "exported" / IMAGES_DIR, data / NPZ_NAME):
        out = tmp_path / f"{source.name}.png"
        assert main(["data", "show", str(source), "--out", str(out)]) == 0
        with Image.open(out) as img:
            assert img.mode == "RGB" and img.size[0] > 0
    capsys.readouterr()
    # An export is decoded at the size it was written at (32 here), not resampled to the default 64.
    assert open_data_dir(tmp_path / "exported" / IMAGES_DIR).image_size == 32


def test_show_draws_what_exists_and_says_what_it_could_not(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert _synth(data) == 0  # 6 identities x 3 images
    capsys.readouterr()
    for source in (data, data / IMAGES_DIR):
        png = tmp_path / f"{source.name}.png"
        assert main(["data", "show", str(source), "--out", str(png), "--identities", "12", "--per-identity", "5"]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"wrote {png}: 6 identities, up to 3 images each",
            "drew 6 of the 12 identities asked for: the data set has 6",
            "drew fewer than the 5 images per identity asked for in 6 of the 6 rows: "
            "those identities have only 3 images"]
        face = 32 * -(-sheet.MIN_FACE // 32)
        cell_w, cell_h = face + sheet.PAD, face + sheet.CAPTION_HEIGHT + sheet.PAD
        with Image.open(png) as img:  # as wide as the rows drawn, not as the columns asked for
            assert img.size == (sheet.PAD + 3 * cell_w, sheet.PAD + 6 * cell_h)
            pixels = np.asarray(img)
        for row in range(6):  # every row holds a face in each of its three cells
            for col in range(3):
                y, x = sheet.PAD + row * cell_h, sheet.PAD + col * cell_w
                assert pixels[y:y + face, x:x + face].std() > 10, (row, col)


def test_show_notes_identities_with_fewer_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = FaceDataset(images=np.full((5, 16, 16, 3), 128, dtype=np.uint8), identity=[0, 0, 0, 1, 2],
                     gender=[0] * 5, group=[-1] * 5, age=[-1] * 5, labels={}, sample_ids=list("abcde"), source="x")
    layout = sheet.sheet_layout(ds, max_identities=2, per_identity=3)
    assert [r.tolist() for r in layout.rows] == [[0, 1, 2], [3]] and layout.columns == 3
    assert layout.shortfall() == ["drew fewer than the 3 images per identity asked for in 1 of the 2 rows: "
                                  "those identities have only 1 image"]
    assert sheet.sheet_layout(ds, max_identities=3, per_identity=1).shortfall() == []


def test_show_errors_name_the_path_or_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing-here"
    assert main(["data", "show", str(missing), "--out", str(tmp_path / "x.png")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert _synth(tmp_path / "d", "--no-export") == 0
    capsys.readouterr()
    assert main(["data", "show", str(tmp_path / "d"), "--out", str(tmp_path / "x.png"), "--per-identity", "0"]) == 2
    assert "--identities and --per-identity must be >= 1, got 12, 0" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# --- baseline -------------------------------------------------------------------------------

BASELINE_SET = ["data.identities=40", "train.epochs=1"]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny baseline run through the CLI, shared by the checks below."""
    runs = tmp_path_factory.mktemp("runs")
    argv = ["--no-progress", "baseline", "--out", str(runs)]
    for item in BASELINE_SET:
        argv += ["--set", item]
    buf = io.StringIO()  # module-scoped, so capsys is not available: redirect stdout instead
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    (run_dir,) = list(runs.iterdir())
    return run_dir, buf.getvalue()


def test_baseline_writes_a_complete_run_directory(baseline_run: tuple[Path, str]) -> None:
    run_dir, stdout = baseline_run
    assert {"config.toml", "manifest.json", "metrics.jsonl", "models"} <= {p.name for p in run_dir.iterdir()}
    models = sorted(p.name for p in (run_dir / "models").glob("*.safetensors"))
    assert "identity.safetensors" in models and len(models) >= 2
    assert "verification AUC" in stdout and f"run directory: {run_dir}" in stdout
    # The printed table shows the logged numbers.
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    identity = [e for e in events if e["event"] == "identity"]
    assert len(identity) == 1 and identity[0]["steps"] >= 1
    row = re.search(r"verification AUC, backbone\s+([0-9.]+)", stdout)
    assert row and float(row.group(1)) == pytest.approx(identity[0]["backbone_auc"], abs=1e-4)
    assert not list(run_dir.rglob("*.tmp"))  # every file was written atomically


def test_baseline_config_toml_is_the_resolved_config(baseline_run: tuple[Path, str]) -> None:
    run_dir, _ = baseline_run
    assert load_config(run_dir / "config.toml") == load_config(None, BASELINE_SET)


def test_baseline_manifest_matches_the_generated_data(baseline_run: tuple[Path, str]) -> None:
    run_dir, _ = baseline_run
    cfg = load_config(run_dir / "config.toml")
    ds = generate(synth_config(cfg))  # regenerated independently of the run
    manifest = Manifest.load(run_dir / "manifest.json", expect_fingerprint=ds.fingerprint())
    assert manifest.num_samples == len(ds) == 40 * cfg.data.images_per_identity
    with pytest.raises(ValueError, match="does not match the expected fingerprint"):
        Manifest.load(run_dir / "manifest.json", expect_fingerprint="0" * 64)


def test_baseline_checkpoint_reproduces_the_logged_auc(baseline_run: tuple[Path, str]) -> None:
    run_dir, _ = baseline_run
    cfg = load_config(run_dir / "config.toml")
    ds = generate(synth_config(cfg))
    manifest = Manifest.load(run_dir / "manifest.json", expect_fingerprint=ds.fingerprint())
    state, meta = load_checkpoint(run_dir / "models" / "identity.safetensors")
    assert meta["task"] == "identity"
    model = FaceModel(ModelSpec.from_dict(meta["spec"]))
    model.load_state_dict(state, strict=True)
    probe = ds.subset(probe_identity_mask(manifest, ds))
    with torch.no_grad():
        auc = verification_auc(embed(model, probe.images), probe.identity, seed=cfg.seed)
    logged = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["event"] == "identity")
    assert auc == pytest.approx(logged["backbone_auc"], abs=1e-6)


@pytest.mark.parametrize(("overrides", "key"), [
    (["train.epochs=0"], "train.epochs"),
    (["nope=1"], "nope"),
    (["dp.target_epsilon=abc"], "dp.target_epsilon"),
    (["train.epochs"], "expected KEY=VALUE"),
])
def test_baseline_bad_config_exits_nonzero_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          overrides: list[str], key: str) -> None:
    argv = ["--no-progress", "baseline", "--out", str(tmp_path / "runs")]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("facefl: error: ") and key in err, err
    assert not (tmp_path / "runs").exists()  # nothing is started on a bad configuration


def test_baseline_bad_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text("[train\nepochs = 1\n")
    assert main(["baseline", str(bad), "--out", str(tmp_path / "runs")]) == 2
    assert f"{bad}: not valid TOML" in capsys.readouterr().err
