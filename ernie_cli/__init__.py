"""ernie: run Baidu's ERNIE 4.5 text models in plain PyTorch."""

__version__ = "0.1.0"
