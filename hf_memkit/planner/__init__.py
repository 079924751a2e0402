"""``memkit plan`` / ``hf_memkit.plan``: a memory budget in, the recipe expected to train best within it out.

```python
import hf_memkit
p = hf_memkit.plan("smollm2", "1GiB", seq_len=256, batch_size=4)
print(p.explain())        # the pick, the candidates that fit, the nearest that do not
p.recipe                  # a Recipe (None when nothing fits; p.suggestion says what it would take)
```

The search space (:mod:`.space`), the priors measured by the project's own benchmark (:mod:`.priors`,
``priors.yaml``), the ranking (:mod:`.search`) and ``--verify`` (:mod:`.verify`). No tool in the field plans
ahead: the stock Trainer's ``auto_find_batch_size`` halves the batch after an out-of-memory crash.
"""

from __future__ import annotations

from .search import Plan, Scored, parse_size, plan
from .space import Candidate

__all__ = ["Candidate", "Plan", "Scored", "parse_size", "plan"]
