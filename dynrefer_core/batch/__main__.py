"""python -m dynrefer_core.batch (also under torchrun): `dynrefer describe`."""
from .command import main

raise SystemExit(main())
