"""pchmr.

Importing pchmr turns off what Flower sends about its use to Flower's servers, in this process and
the processes it starts (Ray's workers, SuperLinks, SuperNodes, ``flwr``), unless the user set the
variables (:mod:`pchmr._flower_env`).
"""

from pchmr._flower_env import flower_reporting_off

flower_reporting_off()
