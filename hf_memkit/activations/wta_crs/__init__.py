"""WTA-CRS: Linear weight gradients from k sampled token rows. See :class:`.config.WtaCrsConfig`."""
