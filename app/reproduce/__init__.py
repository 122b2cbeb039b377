"""``fednca reproduce``: the FedNCA paper's figure (Dice against bytes sent per round) on the
project's own phantom federation. :mod:`.methods` names what is compared and the shared plan,
:mod:`.nca_arm` runs the NCA methods through real daemons and a coordinator, :mod:`.unet_arm` the
federated UNets, :mod:`.records` writes what was measured and :mod:`.figures` draws it
(matplotlib, the ``reproduce`` extra)."""
