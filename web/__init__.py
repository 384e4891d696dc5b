"""
The admin web app of smtpgw: pages for admins and a JSON API, served with
Klein by the gateway's own process.
"""
