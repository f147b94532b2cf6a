"""FedBraTS: federated brain tumor segmentation. The `fedbrats` command lives in `fedbrats.cli`."""

__version__ = "0.1.0"
