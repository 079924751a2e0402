"""Loss techniques (the recipe's ``loss`` slot): each replaces how the Trainer computes the training loss."""
