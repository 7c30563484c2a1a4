"""One configuration object for every job: the schema (defaults, allowed values) and its loader."""

from common.config.loader import dump_toml, from_flat, load_config, parse_overrides
from common.config.schema import (
    AuditConfig,
    Config,
    ConfigError,
    DataConfig,
    DPConfig,
    FairnessConfig,
    FederationConfig,
    HEConfig,
    ModelConfig,
    MoteConfig,
    PretrainConfig,
    SplitSettings,
    TrainConfig,
)

__all__ = [
    "AuditConfig",
    "Config",
    "ConfigError",
    "DPConfig",
    "DataConfig",
    "FairnessConfig",
    "FederationConfig",
    "HEConfig",
    "ModelConfig",
    "MoteConfig",
    "PretrainConfig",
    "SplitSettings",
    "TrainConfig",
    "dump_toml",
    "from_flat",
    "load_config",
    "parse_overrides",
]
