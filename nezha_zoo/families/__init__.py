"""One module per family: its config class and parameter spec, registered on import."""

from nezha_zoo.families import electra, ibert, mpnet, mpt, nezha, xlm_roberta_xl  # noqa: F401
