"""pbt-rl: Population Based Training for actor-critic RL agents."""
__version__ = "0.1.0"
