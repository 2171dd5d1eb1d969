"""What only training and evaluation use: stages, LightningModule base, datasets, degradations, losses, metrics.

Nothing in `zoo.components` outside this package, no `network.py` and no `pipeline.py` imports it, so
inference (`zoo.load`, hub entries, `zoo upscale`) never loads Lightning, torchmetrics, pyiqa or timm.
`tests/test_contract.py` guards this for every registered model.
"""
