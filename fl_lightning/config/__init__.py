"""The run configuration: `schema` (typed sections), `load` (YAML and overrides, validated
once), `coerce` (key and type checks), `validate` and `privacy_rules` (the rules),
`trainer_flags`, `class_path`, `yaml_input` and `node_config` (a SuperNode's settings).

`from fl_lightning.config import Config, load_config` is the short import for scripts.
"""

from fl_lightning.config.load import config_from_dict, load_config
from fl_lightning.config.schema import Config

__all__ = ["Config", "config_from_dict", "load_config"]
