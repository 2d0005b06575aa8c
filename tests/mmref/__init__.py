"""Running mmdetection / mmsegmentation's Python as a reference, on the CPU, without mmcv's compiled ops.

Only the fixture generators import this (in an environment with the mm packages, see
docs); the tests themselves read the fixtures those generators wrote.
"""
