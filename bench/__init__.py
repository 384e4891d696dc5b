"""
Benchmarks for smtpgw: a load generator, the servers it is pointed at, and the
harness behind C{make bench}. Benchmarks print figures; they are not tests.
"""
