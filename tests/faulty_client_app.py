"""A ClientApp that is ``client.app``'s, except that chosen clients crash in chosen rounds (tests only).

``FACEFL_TEST_FAULTS`` holds JSON ``{"<round>": [<partition>, ...]}``: those clients raise
instead of training in that round. A simulation's Ray actors inherit the environment of the
process that starts Ray (as they inherit ``FACEFL_HE_SECRET_CONTEXT``) and Flower gives them the
driver's ``sys.path``, so a test sets the variable and points ``workflow.simulation.CLIENT_APP`` at
``faulty_client_app.app``.
"""

from __future__ import annotations

import json
import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as real
from common import wire

FAULTS_ENV = "FACEFL_TEST_FAULTS"
CRASH = "injected crash"

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, server_round = wire.config_from_record(msg.content[wire.CONFIG])
    partition = wire.partition_of(context.node_config, cfg.split.num_clients)
    if partition in json.loads(os.environ.get(FAULTS_ENV, "{}")).get(str(server_round), []):
        raise RuntimeError(f"{CRASH} of client {partition} in round {server_round}")
    return real.train(msg, context)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    return real.describe(msg, context)
