"""Everything that runs on Ray, in wings that each own one part of the system.

Layers, lowest first: runtime <- artifacts <- text | search <- stages <- reindex | train <- inference.
Nothing here imports ``jobs``; ``models`` is the single-device layer below.
"""
