"""Probes: measurements of a model that are not benchmark scores.

exposure.py  the exposure-bias probe (`soarbench probe`): start the sampler on the data's path, see where it lands
power.py     the minimum detectable difference of a comparison of n items
"""
