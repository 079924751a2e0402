"""Not imported as a package: ``memkit run`` puts this folder on the ``PYTHONPATH`` of a launcher (``trl``,
``accelerate launch``, ``deepspeed``, ``torchrun``) so that its ``sitecustomize`` runs in every Python child.
(This file exists so that the folder ships with the wheel.)"""
