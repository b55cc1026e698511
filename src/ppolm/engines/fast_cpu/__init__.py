"""engines/fast_cpu"""
