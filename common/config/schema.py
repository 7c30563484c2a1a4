"""The configuration schema: every key, its default and its allowed values, and the
cross-field checks. This is the only place defaults live; ``loader`` parses into it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from common.config.values import ConfigError, Section, choice, num
from common.data.sources import SOURCES
from common.data.sources.synthfaces.generator import CONDITIONS
from common.nn.face_model import ARCHS
from common.nn.heads import MARGINS
from common.split.member import LAYOUTS
from common.split.partition import PARTITIONS
from common.train.book_keeping import GRAD_SAMPLE_MODES
from common.train.device import DEVICES
from common.train.fairness import FAIRNESS_METHODS, SENSITIVE_ATTRIBUTES
from common.train.finetune import TRAINABLE
from common.train.identity_dp import DP_UNITS


@dataclass
class DataConfig(Section):
    SECTION = "data"

    source: str = choice("synthfaces", SOURCES)
    path: str = field(default="", metadata={"doc": "root of a real data set on disk (not used by synthfaces); "
                                                   "layout per-member in simulation: one sub-directory per member"})
    layout: str = choice("manifest", LAYOUTS, doc="manifest: every process builds the whole data set and takes "
                                                  "its partition from the server's split (research simulations, "
                                                  "the audit's ground truth); per-member: each member reads only "
                                                  "its own folder (node config data-path, or a sub-directory of "
                                                  "data.path in simulation) and splits it itself; the server "
                                                  "reads no private data (docs/deploy.md)")
    image_size: int = num(64, 32, 128)
    strict: bool = True
    limit: int = num(0, 0, doc="read at most this many samples of a real data set (0 = all)")
    identities: int = num(500, 2, doc="SynthFaces: number of identities")
    images_per_identity: int = num(10, 1, doc="SynthFaces: images per identity")
    male_fraction: float = num(0.5, 0.0, 1.0, doc="SynthFaces: fraction of male identities")
    smiling_rate_female: float = num(0.5, 0.0, 1.0, doc="SynthFaces: P(smiling | female)")
    smiling_rate_male: float = num(0.5, 0.0, 1.0, doc="SynthFaces: P(smiling | male)")
    condition: str = choice("wild", CONDITIONS, doc="SynthFaces: how the members' photos are taken ('wild', or "
                                                   "'studio' as pretrain.condition describes: an easier population "
                                                   "on which a small backbone becomes accurate at FMR 1e-3)")
    smile_visibility: float = num(1.0, 0.0, 1.0, doc="SynthFaces: P(a smiling face shows its smile); below 1 a "
                                                     "model fills the gap with gender, through the smiling rates "
                                                     "(a biased attribute model, FD-MIA's premise)")


@dataclass
class SplitSettings(Section):
    SECTION = "split"

    member: float = num(0.6, 0.0, 1.0, doc="fraction of identities whose samples train the model")
    nonmember: float = num(0.1, 0.0, 1.0, doc="fraction of identities held out entirely")
    aux: float = num(0.2, 0.0, 1.0, doc="fraction of identities given to the attacker")
    probe: float = num(0.1, 0.0, 1.0, doc="fraction of identities for open-set verification")
    member_nonmember_fraction: float = num(0.15, 0.0, 0.9, doc="of each member identity's samples")
    member_probe_fraction: float = num(0.15, 0.0, 0.9, doc="of each member identity's samples")
    num_clients: int = num(4, 1)
    partition: str = choice("identity_disjoint", PARTITIONS, doc="consortium members hold different people by default")
    alpha: float = num(0.5, 1e-6)
    partition_attribute: str = field(default="gender", metadata={
        "doc": "partition = attribute: 'gender', 'group', 'age' or a task-label name"})

    def fractions(self) -> dict[str, float]:
        """Identity fractions by role (``common.split.manifest.ROLES`` order)."""
        return {"member": self.member, "nonmember": self.nonmember, "aux": self.aux, "probe": self.probe}

    def validate(self) -> SplitSettings:
        """Cross-field checks of the split (single fields are checked on construction)."""
        fracs = self.fractions()
        if not math.isclose(sum(fracs.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(f"split.member + split.nonmember + split.aux + split.probe must sum to 1, got {fracs}")
        if self.member <= 0:
            raise ConfigError(f"split.member: expected a fraction > 0 (someone must train the model), got {self.member}")
        if self.member_nonmember_fraction + self.member_probe_fraction >= 1:
            raise ConfigError("split.member_probe_fraction: expected split.member_nonmember_fraction + "
                              f"split.member_probe_fraction < 1, got {self.member_nonmember_fraction} + "
                              f"{self.member_probe_fraction}")
        if not self.partition_attribute:
            raise ConfigError("split.partition_attribute: expected 'gender', 'group', 'age' or a task-label name, "
                              "got ''")
        return self


@dataclass
class ModelConfig(Section):
    SECTION = "model"

    arch: str = choice("resnet_gn", ARCHS, doc="resnet_gn: the small GroupNorm ResNet (width, blocks); iresnet18/50/"
                                                "100: arcface_torch's IResNet with GroupNorm (112 px crops, embedding_dim "
                                                "512 as in ArcFace)")
    width: int = num(32, 4, doc="resnet_gn only")
    blocks: tuple[int, ...] = field(default=(1, 1, 1), metadata={"doc": "resnet_gn only"})
    embedding_dim: int = num(128, 8)
    dropout: float = num(0.0, 0.0, 0.9)
    init_checkpoint: str = field(default="", metadata={
        "doc": "an arcface_torch backbone checkpoint (.pt/.pth read with weights_only, or .safetensors) to start the "
               "IResNet from, before public pretraining; BatchNorm's affine parameters become GroupNorm's, its running "
               "statistics are dropped (docs/models.md)"})


@dataclass
class TrainConfig(Section):
    SECTION = "train"

    task: str = choice("identity", ("identity", "attribute", "both"))
    attribute: str = field(default="smiling", metadata={"doc": "binary target: a task label or 'gender'"})
    margin: str = choice("arcface", MARGINS)
    margin_scale: float = num(30.0, 1.0)
    epochs: int = num(30, 1, doc="central training (baseline, shadow models); clients use federation.local_epochs")
    max_seconds: float = num(0.0, 0.0, doc="stop training after this wall time (0 = no limit)")
    batch_size: int = num(64, 1)
    optimizer: str = choice("adam", ("adam", "sgd"))
    lr: float = num(0.002, 0.0, doc="peak learning rate of the one-cycle schedule")
    momentum: float = num(0.9, 0.0, 1.0)
    weight_decay: float = num(5e-4, 0.0)
    augment: bool = True
    attribute_weight: float = num(1.0, 0.0, doc="task both: weight of the attribute loss against the identity "
                                                 "margin loss (which is 10-20x larger at the start)")
    device: str = choice("auto", DEVICES, doc="where training runs (model, batches, DP noise): auto = CUDA when "
                                              "torch sees a GPU, else cpu; cuda fails, naming this key, on a machine "
                                              "without one (checked where training starts). Data, augmentation, "
                                              "sampling, evaluation and HE stay on the CPU and trained models come "
                                              "back to it; CPU results are unchanged. CUDA's kernels and RNG differ "
                                              "from the CPU's: bit-identical replays hold on the CPU only")


@dataclass
class DPConfig(Section):
    SECTION = "dp"

    mode: str = choice("sample", ("sample", "off"))
    unit: str = choice("sample", DP_UNITS, doc="what one (epsilon, delta) protects: 'sample' = one image (a person "
                                                "gets only group privacy over their images), 'identity' = one person "
                                                "with all of their images (identity-level DP-SGD: Poisson sampling of "
                                                "identities, each identity's summed gradient clipped; with "
                                                "grad_sample_mode bk (per-identity sums before the norm), hooks or "
                                                "functorch, never ghost)")
    max_images_per_identity: int = num(10, 1, doc="dp.unit = identity: at most this many images of a person train "
                                                   "(the first in sample order); a fixed cap, chosen without looking "
                                                   "at the data; identities are drawn with rate q = batch_size / "
                                                   "(cap x identities), ceil(1/q) steps an epoch")
    target_epsilon: float = num(8.0, 0.0, doc="epsilon for the whole run (inf or 0 = use noise_multiplier)",
                                 infinite=True)
    noise_multiplier: float = num(0.0, 0.0, doc="used when target_epsilon is 0 or inf")
    max_grad_norm: float = num(1.0, 1e-9)
    head_clip_share: float = num(0.0, 0.0, 0.99, doc="share of the squared clipping norm C^2 given to the private "
                                                     "identity head, clipped apart from the shared parameters, "
                                                     "which get the rest (per-layer clipping; the joint norm stays "
                                                     "C, so epsilon is unchanged); 0 = flat clipping over all. A "
                                                     "fresh head's gradients are ~60x the backbone's and otherwise "
                                                     "take nearly all of C (docs/privacy-costs.md)")
    delta: float = num(1e-5, 0.0, 1.0)
    accountant: str = choice("rdp", ("rdp", "prv"))
    grad_sample_mode: str = choice("bk", GRAD_SAMPLE_MODES,
                                   doc="how per-sample (or per-identity) gradients are clipped: bk = book-keeping, "
                                       "one backward pass, per layer the cheaper of ghost norm and instantiated "
                                       "gradient (common/train/book_keeping.py, fastest); Opacus' ghost clipping (two "
                                       "backward passes), hooks or functorch. Same clipping, noise and accounting")
    reproducible_noise: bool = field(default=False, metadata={
        "doc": "research simulations only: derive every client's DP noise and Poisson sampling from the run seed "
               "(reproducible runs, exact replays). The server knows the seed, so the DP guarantee then does not hold "
               "against it. Default false: each client draws them from its own entropy. A client refuses it unless "
               "its operator allows it (simulation: facefl does; a SuperNode: node config allow-reproducible-noise=true)"})


@dataclass
class FederationConfig(Section):
    SECTION = "federation"

    rounds: int = num(5, 1)
    local_epochs: int = num(2, 1)
    fraction_train: float = num(1.0, 0.0, 1.0, doc="fraction of clients sampled per round")
    min_train_clients: int = num(2, 1, doc="a round fails with fewer successful replies")
    min_available_clients: int = num(2, 1)
    round_timeout: float = num(3600.0, 1.0, doc="seconds to wait for a round's replies; a train message expires "
                                                 "with it, so a late reply is dropped")
    max_update_mb: float = num(0.0, 0.0, doc="a reply carrying more megabytes (10^6 bytes) is refused before it is "
                                              "decoded (0 = twice a valid update, from the model or the HE "
                                              "ciphertext layout, plus 1 MB)")
    client_cpus: float = num(2.0, 0.1, doc="simulation only: CPUs per client (2 on 2 cores = one at a time)")
    client_gpus: float = num(0.0, 0.0, doc="simulation only: GPU share per client (Ray num_gpus; 0.25 = four "
                                            "clients on one GPU at a time); 0 = none reserved: clients are scheduled "
                                            "by CPUs alone, and with train.device = auto they still train on a GPU "
                                            "they see (train.device = cpu keeps them off it)")
    trainable: str = choice("all", TRAINABLE, doc="what each client's training updates: 'all' parameters, or "
                                                  "'norms': the backbone's normalisation scales and shifts and the "
                                                  "heads (DP noise grows with the trained parameters: on a small "
                                                  "private set DP-SGD adapts a pretrained model better so; "
                                                  "common/train/finetune.py)")
    save_client_models: bool = field(default=True, metadata={
        "doc": "plaintext runs: keep each client's latest post-round model in models/clients/ (what a curious "
               "server holds; `facefl audit` attacks them). HE runs have none"})


@dataclass
class PretrainConfig(Section):
    SECTION = "pretrain"

    identities: int = num(200, 0, doc="public SynthFaces identities for server-side pretraining (0 = none)")
    images_per_identity: int = num(10, 2)
    epochs: int = num(6, 1)
    lr: float = num(0.0, 0.0, doc="peak learning rate of public pretraining (0 = train.lr): it trains every "
                                  "parameter without DP, the clients may train a few with DP (federation.trainable)")
    batch_size: int = num(0, 0, doc="public pretraining's batch size (0 = train.batch_size)")
    optimizer: str = choice("train", ("train", "adam", "sgd"), doc="public pretraining's optimiser ('train' = "
                                                                   "train.optimizer)")
    condition: str = choice("wild", CONDITIONS, doc="how the public population is photographed: 'wild' as the "
                                                   "members' SynthFaces (pretraining already knows their domain), "
                                                   "'studio' near-frontal, evenly lit, plain backdrop, little noise "
                                                   "(a domain gap the federation must close)")


@dataclass
class FairnessConfig(Section):
    SECTION = "fairness"

    method: str = choice("none", FAIRNESS_METHODS)
    sensitive: str = choice("gender", SENSITIVE_ATTRIBUTES)
    lam: float = num(0.05, 0.0, doc="weight of the fair_mixup penalty; tune it per data set and federation: on "
                                     "docs/sweeps/fdmia.toml 0.05 leaves DEO unchanged, 1 closes the gap "
                                     "centrally, 2 gives a constant classifier, and no value works with 4 clients")
    histogram_noise: float = num(10.0, 0.1, doc="reweight under DP-SGD: standard deviation of the Gaussian noise on "
                                                "each (sensitive value, label) count the weights come from; the "
                                                "histogram is released once per client and charged to its ledger. "
                                                "Under DP the weights, scaled to at most 1, multiply each sample's "
                                                "clipped gradient (a weighted loss would be undone by clipping)")


@dataclass
class HEConfig(Section):
    SECTION = "he"

    enabled: bool = field(default=False, metadata={"doc": "clients send CKKS-encrypted updates; the server only adds"})
    public_context: str = field(default="", metadata={"doc": "server: path to public-context.bin (facefl keys init)"})
    encrypt_fraction: float = num(1.0, 0.0, 1.0, doc="fraction of the shared values encrypted, most sensitive "
                                                       "first (Fisher information on public data); the rest is "
                                                       "sent in plaintext")
    on_key_mismatch: str = choice("exclude", ("exclude", "fail"),
                                   doc="a client encrypting with another key: leave it out of the round, or fail")


@dataclass
class MoteConfig(Section):
    SECTION = "mote"

    enabled: bool = field(default=True, metadata={"doc": "enroll every client's identities as MOTE models after "
                                                         "the backbone rounds (identity and both tasks)"})
    share_gallery: bool = field(default=True, metadata={
        "doc": "data.layout = per-member: each member also sends its galleries to the server, which merges them "
               "(the research default); false: galleries stay in each member's state directory and only the "
               "members' MOTE-vs-templates numbers reach the server (templates stay at the site)"})
    balancing_factors: tuple[float, ...] = field(default=(0.0, 0.4, 0.5, 0.6, 1.0), metadata={
        "doc": "one gallery per factor b: the male share of the synthetic genuine samples"})
    kde_population: str = choice("auto", ("auto", "members", "aux", "public"),
                                  doc="embeddings the gender KDEs are fitted on: the client's own members, the aux "
                                      "population or the public (pretraining) population; auto = public with MOTE DP "
                                      "or public impostors (then the KDEs cost no privacy), else members")
    impostor_population: str = choice("members", ("members", "public"), doc=(
        "whose embeddings each model learns to reject: the client's own members (the MOTE paper's recipe; under "
        "MOTE DP these are the protected impostor records) or the public pretraining population (no private "
        "impostor at all, so the enrollment population costs no privacy; the references stay the templates' "
        "subjects)"))
    references: int = num(1, 1, doc="reference images per enrolled identity (the rest of its images are never "
                                     "enrolled; its probe-role images are the genuine probes)")
    synthetic: int = num(100, 5, doc="synthetic genuine samples per identity")
    impostors: int = num(400, 1, doc="real impostor embeddings per identity")
    synthetic_impostors: int = num(100, 0, doc="synthetic impostor samples per identity (drawn from the KDEs)")
    val_fraction: float = num(0.2, 0.0, 1.0, doc="share of each identity's samples kept for early stopping")
    epochs: int = num(100, 1, doc="at most; early stopping on validation loss")
    patience: int = num(5, 1, doc="epochs without a validation-loss improvement before an identity stops")
    min_delta: float = num(0.0, 0.0, doc="smallest validation-loss decrease that counts as an improvement")
    batch_size: int = num(128, 2, doc="even: half genuine, half impostor samples")
    lr: float = num(1e-2, 0.0, doc="peak learning rate of the one-cycle schedule (Adam)")
    weight_decay: float = num(1e-3, 0.0)
    dropout: float = num(0.5, 0.0, 0.998, doc="the rate is quantised to 1/256")
    enroll_batch: int = num(64, 1, doc="identities trained together without MOTE DP (the result does not depend on "
                                        "it); under MOTE DP a client's identities form one stack, one mechanism")
    dp_target_epsilon: float = num(0.0, 0.0, infinite=True, doc=(
        "MOTE DP-SGD: epsilon of a client's whole enrollment (all of its galleries) per impostor record (dp.unit: "
        "one image or one person of the enrollment population); 0 or inf = use dp_noise_multiplier (0 = no MOTE DP). "
        "Delta, accountant, unit and reproducible_noise come from the [dp] section"))
    dp_noise_multiplier: float = num(0.0, 0.0, doc="MOTE DP-SGD noise multiplier when dp_target_epsilon is 0 or inf "
                                                   "(0 = no MOTE DP)")
    dp_max_grad_norm: float = num(1.0, 1e-9, doc="MOTE DP-SGD: clipping norm of each impostor record's gradient "
                                                 "over all models of the gallery (and of each public row's)")
    fp16: bool = field(default=False, metadata={"doc": "store galleries in float16 (half the bytes)"})

    def validate(self) -> MoteConfig:
        """Cross-field checks of MOTE enrollment (single fields are checked on construction).

        Defaults are the MOTE paper's where it gives them (network, optimiser, schedule, loss,
        batch size, epoch limit); data counts, validation share and patience are this project's."""
        if any(not 0 <= b <= 1 for b in self.balancing_factors):
            raise ConfigError(f"mote.balancing_factors: expected values in [0, 1], got {self.balancing_factors}")
        if self.batch_size % 2:
            raise ConfigError(f"mote.batch_size: expected an even number (half genuine, half impostor), "
                              f"got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"mote.val_fraction: expected a value in (0, 1), got {self.val_fraction}")
        if round(self.val_fraction * self.synthetic) < 1:
            raise ConfigError(f"mote.val_fraction: {self.val_fraction} of mote.synthetic = {self.synthetic} leaves no "
                              "genuine validation sample for early stopping")
        return self

    def dp_enabled(self) -> bool:
        """True when MOTE trains with DP-SGD (a finite target epsilon, or a noise multiplier)."""
        return 0 < self.dp_target_epsilon < math.inf or self.dp_noise_multiplier > 0

    def kde_source(self) -> str:
        """The population the gender KDEs are fitted on (``kde_population`` with auto resolved)."""
        if self.kde_population == "auto":
            return "public" if self.dp_enabled() or self.impostor_population == "public" else "members"
        return self.kde_population


@dataclass
class EvaluationConfig(Section):
    SECTION = "evaluation"

    public: str = field(default="", metadata={
        "doc": "data.layout = per-member: the server also evaluates each round's global model (when it can read "
               "it, i.e. without HE) on public data: '' none, 'synthfaces' (evaluation.public_identities public "
               "SynthFaces identities, seeded apart from the pretraining population), or an ImageFolder on the "
               "server's machine"})
    public_identities: int = num(100, 3, doc="evaluation.public = 'synthfaces': how many public identities")


@dataclass
class AuditConfig(Section):
    SECTION = "audit"

    canaries: int = num(0, 0, doc="one-run audit (Steinke, Nasr & Jagielski 2023): this many nonmember-role samples "
                                  "become canaries, each trained (with its attribute label flipped) by one random "
                                  "client with probability 1/2; recorded in canaries.json for the auditor only; "
                                  "needs an attribute task (0 = off)")
    self_references: int = num(2, 0, doc="data.layout = per-member: at the end of the run each member audits the "
                                         "final model on its own data and sends back numbers only "
                                         "(attacks/self_audit.py), with this many reference models trained on "
                                         "half its held-out images (0 = loss attack only)")
    self_audit: bool = field(default=True, metadata={"doc": "data.layout = per-member: run the members' self-audit "
                                                            "at the end of the run"})


@dataclass
class Config:
    seed: int = num(0, 0)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitSettings = field(default_factory=SplitSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    he: HEConfig = field(default_factory=HEConfig)
    mote: MoteConfig = field(default_factory=MoteConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def validate(self) -> Config:
        """Cross-field checks (single fields are checked while parsing)."""
        self.split.validate()
        if self.data.source != "synthfaces" and not self.data.path and self.data.layout != "per-member":
            raise ConfigError(f"data.path: required for data.source={self.data.source!r} (a directory on disk)")
        if self.data.layout == "per-member":
            self._check_per_member()
        elif self.evaluation.public:
            raise ConfigError("evaluation.public: only with data.layout = 'per-member' (with the manifest the server "
                              "evaluates every round on its probe identities)")
        if self.data.image_size % 16:
            raise ConfigError(f"data.image_size: expected a multiple of 16, got {self.data.image_size}")
        attrs = ("gender", "smiling") if self.data.source == "synthfaces" else None
        if self.train.task != "identity" and attrs and self.train.attribute not in attrs:
            raise ConfigError(f"train.attribute: expected one of {attrs} for SynthFaces, got {self.train.attribute!r}")
        if self.dp.mode == "sample" and not self.dp_calibrated() and self.dp.noise_multiplier <= 0:
            raise ConfigError("dp.noise_multiplier: expected > 0 when dp.target_epsilon is 0 or inf")
        if self.fairness.method != "none" and self.train.task == "identity":
            raise ConfigError(f"fairness.method: {self.fairness.method!r} needs an attribute task "
                              "(train.task = attribute or both), got train.task = 'identity'")
        if self.audit.canaries and self.train.task == "identity":
            raise ConfigError(f"audit.canaries: {self.audit.canaries} canaries are scored on the attribute head, "
                              "which train.task = 'identity' has none of; set train.task = attribute or both, or "
                              "audit.canaries = 0")
        if self.dp.head_clip_share > 0 and self.dp.grad_sample_mode == "ghost":
            raise ConfigError("dp.head_clip_share: ghost clipping computes one norm per sample and cannot clip the "
                              "head apart; use dp.grad_sample_mode = bk, hooks or functorch")
        if self.fairness.method == "fair_mixup" and self.dp.mode != "off":
            raise ConfigError("fairness.method: 'fair_mixup' couples samples across a batch and cannot be "
                              "combined with DP-SGD's per-sample clipping; use 'reweight' with dp.mode = sample")
        if self.fairness.method == "reweight" and self.dp.mode != "off" and self.dp.unit == "identity":
            raise ConfigError("dp.unit: 'identity' cannot be combined with fairness.method = 'reweight' yet: the "
                              "reweighting histogram is released and accounted with the sensitivity of one image, "
                              "not of one person's images")
        if self.model.init_checkpoint and self.model.arch == "resnet_gn":
            raise ConfigError("model.init_checkpoint: an arcface_torch checkpoint fits an IResNet; set model.arch to "
                              "iresnet18, iresnet50 or iresnet100")
        if self.federation.min_train_clients > self.split.num_clients:
            raise ConfigError(f"federation.min_train_clients: expected at most split.num_clients = "
                              f"{self.split.num_clients}, got {self.federation.min_train_clients}")
        self.mote.validate()
        if self.mote.enabled and self.mote.dp_enabled():
            if self.mote.kde_source() != "public":
                raise ConfigError(f"mote.kde_population: {self.mote.kde_population!r} fits the KDEs on private "
                                  "embeddings outside MOTE's DP accountant; use 'public' or 'auto' with MOTE DP")
            if self.pretrain.identities == 0:
                raise ConfigError("mote.dp_target_epsilon: MOTE DP fits its KDEs and draws its validation impostors "
                                  "from the public population; set pretrain.identities > 0")
            if self.mote.impostor_population == "public":
                raise ConfigError("mote.dp_target_epsilon: with mote.impostor_population = 'public' MOTE trains on no "
                                  "private impostor record, so its DP has nothing to protect; set it to 0")
        if self.mote.enabled and self.mote.impostor_population == "public" and self.pretrain.identities == 0:
            raise ConfigError("mote.impostor_population: 'public' draws the impostors from the public population; "
                              "set pretrain.identities > 0")
        if self.he.enabled and not self.he.public_context:
            raise ConfigError("he.public_context: required when he.enabled = true (the path of the server's "
                              "public-context.bin from `facefl keys init`)")
        if not self.he.encrypt_fraction > 0:
            raise ConfigError(f"he.encrypt_fraction: expected a value in (0, 1], got {self.he.encrypt_fraction}")
        if self.he.enabled and self.he.encrypt_fraction < 1 and self.pretrain.identities == 0:
            raise ConfigError("he.encrypt_fraction: < 1 needs public data to rank parameters (pretrain.identities "
                              "> 0); set he.encrypt_fraction = 1 to encrypt everything")
        return self

    def _check_per_member(self) -> None:
        """What needs the server's view of all the data cannot run when members keep their own."""
        if self.data.source == "synthfaces":
            raise ConfigError("data.layout: 'per-member' reads each member's own folder; set data.source to its "
                              "format (e.g. 'imagefolder'; `facefl data synth --members N` writes SynthFaces so)")
        if self.audit.canaries:
            raise ConfigError(f"audit.canaries: {self.audit.canaries} canaries need the server's split of all the "
                              "data, which data.layout = 'per-member' does not have; set audit.canaries = 0")
        if self.mote.enabled and self.train.task != "attribute" and self.mote.kde_source() == "aux":
            raise ConfigError("mote.kde_population: 'aux' is the server's split's attacker share, which "
                              "data.layout = 'per-member' does not have; use 'members' or 'public'")

    def dp_calibrated(self) -> bool:
        """True when noise is calibrated from a finite target epsilon."""
        return 0 < self.dp.target_epsilon < math.inf

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_flat(self) -> dict[str, Any]:
        """Dotted scalar keys (tuples as comma strings): the shape of Flower's run_config."""
        flat: dict[str, Any] = {}
        flatten(self.to_dict(), "", flat)
        return flat


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def flatten(d: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flatten(v, key + ".", out)
        else:
            out[key] = ",".join(str(x) for x in v) if isinstance(v, list) else v


