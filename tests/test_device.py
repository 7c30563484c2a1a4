"""``train.device``: auto trains on the CPU where there is no CUDA, bit for bit as cpu does; cuda
is refused there, naming the key, by every training path; a simulation's clients get
``federation.client_gpus`` as Ray's GPU share. The CUDA tests run only where CUDA is (they are
the ones ``bench/gpu_check.py`` runs by name)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import Config, DPConfig, MoteConfig, TrainConfig, load_config
from common.nn.build import build_identity_head, build_model
from common.train.device import resolve_device
from common.train.dp import dp_generators
from common.train.loop import train

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing",
                                        "ignore:The given NumPy array is not writable")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DP_MODES = {"no DP": DPConfig(mode="off"),
            **{f"DP {mode}": DPConfig(mode="sample", grad_sample_mode=mode, noise_multiplier=1.0)
               for mode in ("bk", "ghost")},
            **{f"DP identity {mode}": DPConfig(mode="sample", unit="identity", grad_sample_mode=mode,
                                               max_images_per_identity=4, noise_multiplier=1.0)
               for mode in ("bk", "hooks")}}


@pytest.fixture()
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _train(ds, spec, device: str, dp: DPConfig, task: str = "both") -> tuple[torch.nn.Module, torch.nn.Module]:
    model, head = build_model(spec, 0), build_identity_head(spec, ds.num_identities, 1)
    cfg = TrainConfig(task=task, attribute="gender", batch_size=32, device=device)
    train(model, ds, cfg, dp, seed=3, epochs=1, head=head, noise_multiplier=dp.noise_multiplier, noise_seed=7)
    return model, head


def _state(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, m in enumerate(modules) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("mode", DP_MODES)
def test_auto_without_cuda_trains_on_the_cpu_bit_for_bit(mode: str, synth_small, tiny_spec, no_cuda) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    auto, cpu = _state(*_train(synth_small, tiny_spec, "auto", DP_MODES[mode])), \
        _state(*_train(synth_small, tiny_spec, "cpu", DP_MODES[mode]))
    initial = _state(build_model(tiny_spec, 0), build_identity_head(tiny_spec, synth_small.num_identities, 1))
    assert any(not torch.equal(auto[k], initial[k]) for k in auto)  # it trained
    for k, v in auto.items():
        assert v.device.type == "cpu" and torch.equal(v, cpu[k]), k


def test_cuda_without_cuda_is_refused_naming_the_key_before_training(synth_small, tiny_spec, no_cuda) -> None:
    """The configuration loads (a server may configure GPU clients); training refuses it."""
    cfg = load_config(None, ["train.device=cuda"])
    assert cfg.train.device == "cuda"
    model = build_model(tiny_spec, 0)
    before = _state(model)
    with pytest.raises(ValueError, match=r"train\.device: 'cuda', but CUDA is not available"):
        train(model, synth_small, TrainConfig(task="attribute", attribute="gender", device="cuda"),
              DPConfig(mode="off"), seed=0, epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_every_training_path_refuses_cuda_without_cuda(synth_small, tiny_spec, no_cuda) -> None:
    """Reference models, MINT and MOTE resolve train.device through the same function."""
    from attacks.mint import VanillaMINT
    from attacks.reference_models import train_references
    from common.mote.gallery import enroll

    refused = pytest.raises(ValueError, match=r"train\.device: 'cuda'")
    with refused:
        train_references(tiny_spec, synth_small.images, synth_small.gender, np.ones((1, len(synth_small)), bool),
                         TrainConfig(device="cuda"), 1, [0])
    with refused:
        VanillaMINT(seed=0, device="cuda")
    with refused:
        enroll(np.zeros((1, 4), np.float32), np.zeros(1, np.int64), None, np.zeros((2, 4), np.float32),
               np.ones(2, np.int64), 0.5, 0, device="cuda")


def test_simulated_clients_get_the_gpu_share_and_it_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from workflow.simulation import backend_config

    assert backend_config(Config())["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    shared = load_config(None, ["federation.client_gpus=0.25", "federation.client_cpus=1"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_config(shared)["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"federation\.client_gpus: 0\.25 .* CUDA is not available"):
        backend_config(shared)
    with pytest.raises(ValueError, match=r"train\.device: 'cuda'"):
        backend_config(load_config(None, ["train.device=cuda"]))


@needs_cuda
@pytest.mark.parametrize("mode", [m for m in DP_MODES if m != "no DP"])
def test_cuda_dp_training_returns_a_cpu_model_with_noise_drawn_on_cuda(mode: str, synth_small, tiny_spec,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import common.train.loop as loop

    devices = []

    def spy(noise_seed, device="cpu"):
        noise, sampler = dp_generators(noise_seed, device)
        devices.append((noise.device.type, sampler.device.type))
        return noise, sampler

    monkeypatch.setattr(loop, "dp_generators", spy)
    state = _state(*_train(synth_small, tiny_spec, "cuda", DP_MODES[mode]))
    assert devices == [("cuda", "cpu")]  # noise where the gradients are, Poisson sampling on the CPU
    initial = _state(build_model(tiny_spec, 0), build_identity_head(tiny_spec, synth_small.num_identities, 1))
    assert any(not torch.equal(state[k], initial[k]) for k in state)
    for k, v in state.items():
        assert v.device.type == "cpu" and bool(torch.isfinite(v).all()), k


@needs_cuda
def test_cuda_references_mint_and_mote_come_back_on_the_cpu(synth_small, tiny_spec) -> None:
    from attacks.mint import VanillaMINT
    from attacks.reference_models import train_references
    from common.mote.gallery import enroll
    from common.mote.kde import GenderKDE
    from common.mote.private import ImpostorRecords, PrivateRun, plan

    in_mask = np.random.default_rng(0).random((2, len(synth_small))) < 0.5
    for vectorised in (True, False):
        models = train_references(tiny_spec, synth_small.images, synth_small.gender, in_mask,
                                  TrainConfig(batch_size=16, device="cuda"), 1, [1, 2], vectorised=vectorised)
        assert all(p.device.type == "cpu" and bool(torch.isfinite(p).all()) for m in models for p in m.parameters())
    rng = np.random.default_rng(0)
    feats, used = rng.normal(size=(64, 8)).astype(np.float32), np.arange(64) % 2 == 0
    scores = VanillaMINT(seed=0, epochs=2, device="cuda").fit(feats, used).score(feats)
    assert scores.shape == (64,) and np.isfinite(scores).all()
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    ident, gender = np.repeat(np.arange(12), 5), np.repeat(np.arange(12) % 2, 5)
    kde = GenderKDE.fit(emb, ident, gender, bandwidths=[0.1, 0.3], seed=0)
    settings = MoteConfig(synthetic=20, impostors=20, synthetic_impostors=10, batch_size=16, epochs=2)
    gallery = enroll(emb[::5][:4], ident[::5][:4], kde, emb, ident, 0.5, 0, settings, device="cuda")
    assert all(p.device.type == "cpu" and bool(torch.isfinite(p).all()) for p in gallery.params.values())
    records = ImpostorRecords.build(emb[1::5], ident[1::5], "sample", 1)
    noisy = MoteConfig(**{**vars(settings), "dp_noise_multiplier": 1.0})
    private = PrivateRun(records, plan(records, noisy, DPConfig(), galleries=1),
                         *dp_generators(5, resolve_device("cuda")))
    gallery = enroll(emb[::5][:4], ident[::5][:4], kde, emb, -1 - ident, 0.5, 0, noisy, private, device="cuda")
    assert all(p.device.type == "cpu" and bool(torch.isfinite(p).all()) for p in gallery.params.values())
