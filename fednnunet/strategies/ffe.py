"""FFE: federated fingerprint extraction, one plan and one architecture everywhere."""

from fednnunet.strategies.base import Strategy

STRATEGY = Strategy(
    name="ffe",
    summary="federated fingerprint -> identical plans at every site; FedAvg of the whole model",
    planning="federated",
    shared_layers="all",
)
