"""FednnU-Net: federated nnU-Net (FFE and AsymFedAvg) on Flower."""

__version__ = "0.1.0"
