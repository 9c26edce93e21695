"""The algorithms of the grid: CrowdPlay's d3rlpy 0.x/1.x settings translated to d3rlpy 2.8
(the table in the package docstring), each built by `make_algorithm`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# -- 1. Hyperparameters: CrowdPlay's d3rlpy 0.x/1.x settings in d3rlpy 2.8 -----------------------

BATCH_SIZE = 256  # CrowdPlay: batch_size=256 for every algorithm
GAMMA = 0.99  # d3rlpy's default, then and now
TARGET_UPDATE_INTERVAL = 2500  # CrowdPlay's; d3rlpy's default is 8000


@dataclass(frozen=True)
class AlgorithmSpec:
    """One row of the hyperparameter table: a d3rlpy 2.8 config and its settings."""

    crowdplay: str  # CrowdPlay's `--algorithm` value and the d3rlpy 0.x class it built
    config_class: str  # the d3rlpy 2.8 config class in `d3rlpy.algos`
    settings: Mapping[str, Any]  # config fields; `q_func_factory` as (name, options)
    loss_key: str  # the d3rlpy metric plotted as the training loss


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "bc": AlgorithmSpec(
        "BC: DiscreteBC",
        "DiscreteBCConfig",
        {"learning_rate": 3e-5, "beta": 0.5, "batch_size": BATCH_SIZE},
        loss_key="loss",
    ),
    "bcq": AlgorithmSpec(
        "BCQ: DiscreteBCQ",
        "DiscreteBCQConfig",
        {
            "learning_rate": 1e-4,
            "action_flexibility": 0.5,
            "beta": 0.5,
            "q_func_factory": ("mean", {}),
            "n_critics": 1,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="loss",
    ),
    "cql": AlgorithmSpec(
        "CQL: DiscreteCQL",
        "DiscreteCQLConfig",
        {
            "learning_rate": 6.25e-5,
            "alpha": 1.0,
            "q_func_factory": ("qr", {"n_quantiles": 32}),
            "n_critics": 1,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="loss",
    ),
    "iqn": AlgorithmSpec(
        "IQN: DQN with IQNQFunctionFactory",
        "DQNConfig",
        {
            "learning_rate": 1e-4,
            "q_func_factory": (
                "iqn",
                {"n_quantiles": 16, "n_greedy_quantiles": 16, "embed_size": 512},
            ),
            "n_critics": 1,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="loss",
    ),
    "dqn": AlgorithmSpec(
        "DQN: DoubleDQN",
        "DoubleDQNConfig",
        {
            "learning_rate": 3e-5,
            "q_func_factory": ("mean", {}),
            "n_critics": 1,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="loss",
    ),
    "sac": AlgorithmSpec(
        "SAC: DiscreteSAC",
        "DiscreteSACConfig",
        {
            "actor_learning_rate": 3e-4,
            "critic_learning_rate": 3e-4,
            "temp_learning_rate": 3e-4,
            "initial_temperature": 1.0,
            "n_critics": 2,
            "gamma": GAMMA,
            "target_update_interval": TARGET_UPDATE_INTERVAL,
            "batch_size": BATCH_SIZE,
        },
        loss_key="critic_loss",
    ),
}


def make_algorithm(name: str, *, batch_size: int | None = None, device: str = "cpu:0"):
    """The d3rlpy 2.8 algorithm of table row `name` (`batch_size` overrides the table's)."""
    import d3rlpy

    spec = ALGORITHMS[name]
    settings = dict(spec.settings)
    if "q_func_factory" in settings:
        kind, options = settings["q_func_factory"]
        factories = {
            "mean": d3rlpy.models.MeanQFunctionFactory,
            "qr": d3rlpy.models.QRQFunctionFactory,
            "iqn": d3rlpy.models.IQNQFunctionFactory,
        }
        settings["q_func_factory"] = factories[kind](**options)
    if batch_size is not None:
        settings["batch_size"] = batch_size
    config_class = getattr(d3rlpy.algos, spec.config_class)
    config = config_class(
        observation_scaler=d3rlpy.preprocessing.PixelObservationScaler(), **settings
    )
    return config.create(device=device)
