"""Model families; each module registers its backbones on import."""
