"""Deploying a run's models: ``cafedist export`` (:mod:`cafedist.deploy.export`) writes each
client's early-exit network as ``torch.export`` programs, one per exit, with its exit policy;
:mod:`cafedist.deploy.early_exit` (torch only, copied into every export) runs them."""
