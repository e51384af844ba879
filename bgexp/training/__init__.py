"""Lightning: the Boltzmann-generator module, losses, data module, callbacks, run assembly."""
