"""What every phase after training starts from: a run's config, data and manifest."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from common.config import Config, load_config
from common.data.dataset import FaceDataset
from common.data.sources import load_source
from common.split.manifest import Manifest
from common.data.sources.synthfaces.generator import SynthConfig, generate
from common.nn.checkpoint import check_state, load_checkpoint
from common.nn.face_model import FaceModel, ModelSpec
from common.nn.heads import CosineClassifier
from common.runs.rundir import RunDir


def load_run(run: RunDir) -> tuple[Config, FaceDataset, Manifest]:
    """A run's configuration, its data set (rebuilt from that configuration) and its manifest,
    checked to belong together: what every phase after training starts from."""
    cfg = load_config(run.config_path)
    ds = build_dataset(cfg)
    return cfg, ds, Manifest.load(run.manifest_path, expect_fingerprint=ds.fingerprint())


