"""DynRefer network blocks, one concept per file; `dynrefer.DynRefer` composes them."""
