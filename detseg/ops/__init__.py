"""Operations torchvision lacks."""
