"""Serve a merged model (TGI, vLLM, or the local CPU server) and talk to it (serving.client).

from serving.client import ServingClient
client = ServingClient("http://127.0.0.1:8080")
print(client.chat("こんにちは").text)
"""
