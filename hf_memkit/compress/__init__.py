"""What the ``compress:`` techniques share, whichever family they come from (``quant/`` quantizers and LoRC,
``prune/`` pruners, EfficientQAT's trainer): the plan one recipe's compress list becomes
(:mod:`.plan`), the technique base class and its lifecycle (:mod:`.technique`), and how a post-training pass
runs beside the trained model (:mod:`.aside`).

Each technique declares what it can do as class attributes (:class:`.technique.CompressTechnique`: ``role``,
``calibrated``, ``keeps_nm``, ``leaves_nm``, ``rebuilds_modules``, ``trains_blocks``); the plan and the passes
read those, never a table of names, so a new compress technique needs no edit here.
"""
