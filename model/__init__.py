"""A faithful Engram module and a small Engram language model that runs through the memstore."""
