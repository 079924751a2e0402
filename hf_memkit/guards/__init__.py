"""``guard:`` techniques: watch a run and stop (or skip) what would waste it."""
