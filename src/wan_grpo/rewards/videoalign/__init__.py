"""VideoAlign (VideoReward) scoring. This version has the video preprocessing; the model loader
and scorer come with issue 5, and ``--reward videoalign`` is refused until then."""
