"""The weak-to-strong alignment loop and the toy world it is demonstrated in.

`tasks` (verifiable task families), `toy_world` (the files a demonstration starts from).
"""
