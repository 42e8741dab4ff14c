"""Control: how a user drives flwr-hpc.

Owns the ``flwr-hpc`` CLI (:mod:`.cli`), the HPC SuperLink service that the stock ``flwr``
CLI talks to (:mod:`.service`), who may use it (:mod:`.access`) and ``flwr-hpc sites
check`` (:mod:`.sites`). It sits on top: it may import the server side, the strategies
package of flwr_hpc and the shared modules; nothing else imports it.
"""
