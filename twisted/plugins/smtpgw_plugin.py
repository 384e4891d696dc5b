from twisted.application.service import ServiceMaker

smtpgw = ServiceMaker(
    "smtpgw",
    "smtpgw.tap",
    "Authenticated SMTP relay gateway with a durable priority queue",
    "smtpgw",
)
