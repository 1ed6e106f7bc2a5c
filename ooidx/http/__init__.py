"""The HTTP edge toolkit shared by the proxy port and the web port."""
