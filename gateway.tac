# twistd -ny gateway.tac: the same service as `twistd -n smtpgw`, with the
# options taken from the SMTPGW_OPTIONS environment variable (shell words).
import os
import shlex

from twisted.application.service import Application

from smtpgw.tap import Options, makeService

options = Options()
options.parseOptions(shlex.split(os.environ.get("SMTPGW_OPTIONS", "")))
application = Application("smtpgw")
makeService(options).setServiceParent(application)
