"""Subject (DINOv2) and motion (RAFT) representations: SMRABooth's alignment targets.

Import the submodules directly (`representations.subject`, `representations.motion`,
`representations.storage`); this package does not import them so it stays cheap to load.
"""
