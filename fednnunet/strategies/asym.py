"""AsymFedAvg: each site plans alone; only the layers every site shares are averaged."""

from fednnunet.strategies.base import Strategy

STRATEGY = Strategy(
    name="asym",
    summary="local plans per site; FedAvg of the layers with the same name and shape everywhere",
    planning="local",
    shared_layers="common",
)
