"""The stages: Ray, img2dataset and MLflow around the library in `segclip`.

`segclip` comes first: its import sets the environment defaults (no albumentations update
check over the network, no wandb) before a stage module imports img2dataset, in every
process that runs a stage, a spawned download worker or a Ray worker included.
"""

import segclip  # noqa: F401
