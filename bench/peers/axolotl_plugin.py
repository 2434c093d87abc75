"""axolotl plugin adding the bench's throughput callback (config: `plugins: [axolotl_plugin.ThroughputPlugin]`)."""

from axolotl.integrations.base import BasePlugin
from throughput_callback import PeerThroughput


class ThroughputPlugin(BasePlugin):
    def add_callbacks_pre_trainer(self, cfg, model):
        return [PeerThroughput()]
