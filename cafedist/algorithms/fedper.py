"""FedPer-EE: a shared body averaged by FedAvg, every exit head personal.

Source: Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with Personalization
Layers" (arXiv 1912.00818, 2019); reference implementation as in PFLlib
(TsingZ0/PFLlib, ``clientper.py`` / ``serverper.py``). Clients train the whole network with CE
locally; only the base layers are sent and averaged, the personalization layers stay on the
client.

"-EE": the base layers are the body (``blocks.*``) and the personalization layers are all
exit heads (``heads.*``), each trained with CE (summed over exits). Deviations: the
personalization layers of a shallow exit include its small conv head, not only a fully
connected layer; averaging is sample-weighted over the clients that trained this round (the
loop's deterministic all-reduce), as in FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass

from cafedist.algorithms.common import SharedBody


@dataclass
class FedPerParams:
    """FedPer has no hyperparameters beyond the training schedule."""


class FedPer(SharedBody):
    """Body averaged, heads personal, all parameters trained every local step."""

    name = "fedper"
    Params = FedPerParams
