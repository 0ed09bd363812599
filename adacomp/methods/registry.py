"""Registers every method's gin configurables: import it before parsing a config that names one.

Only the entry points (train.py, eval.py, scripts/) import this module; the core never does, so
a method is added by one new package under adacomp/methods/ (and its layer file) plus one line
here.
"""
# pylint: disable=unused-import
from adacomp.methods.duo import factories as duo_factories
from adacomp.methods.informed_routing import factories as informed_routing_factories
from adacomp.methods.skipdecode import schedule as skipdecode_schedule
from adacomp.methods.tokenformer import factories as tokenformer_factories
